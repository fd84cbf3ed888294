"""A scripted engine for the compatibility tests: the real server (build_app) over an
engine that answers each request with a given text, so the reasoning and tool parsers
are driven through HTTP by outputs in each model family's published format.

The tokenizer is a byte-level BPE without merges (one token per byte, plus the special
tokens the formats use, one token each), built in memory: the streamed deltas are then
split at every byte, the hardest case for an incremental parser. Its chat template
renders every message key the server hands it (extra keys, custom roles) and the template
variables, so the tests can see what reached the template.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Callable, Optional

from asgl.engine.contracts.outputs import StreamChunk

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start|>", "<|channel|>", "<|message|>",
            "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"]

# Renders every key of every message (sorted), and the variables the tests pass.
TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] }}"
    "{%- for k, v in m | dictsort -%}{%- if k not in ('role', 'content') -%}"
    "{{ ' ' + k + '=' + v | string }}{%- endif -%}{%- endfor -%}"
    "{{ '\\n' + (m['content'] if m['content'] is string else '') + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if reasoning_effort is defined -%}{{ 'effort=' + reasoning_effort + '\\n' }}{%- endif -%}"
    "{%- if enable_thinking is defined -%}{{ 'thinking=' + enable_thinking | string + '\\n' }}"
    "{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = TEMPLATE
    return fast


class ScriptedEngine:
    """The Engine API the server uses; every request's output is `script(prompt_text)`."""

    context_len = 4096
    supports_grammar = False
    stalled = None

    def __init__(self, script: Callable[[str], str], tokenizer=None):
        self.tokenizer = tokenizer or byte_tokenizer()
        self.vocab_size = len(self.tokenizer)
        self.chat_template = None
        self.script = script
        self.scheduler = SimpleNamespace(waiting=[], running=[], stats=SimpleNamespace(
            cached_tokens=0, prompt_tokens=0, num_retractions=0))
        self.runner = SimpleNamespace(device=SimpleNamespace(type="cpu"))
        self.prompts: list[str] = []  # rendered prompts, as the engine saw them
        self.params: list = []
        self.aborted: list[str] = []

    def memory_state(self) -> dict:
        return {"capacity": 4096, "free": 4096, "cached": 0, "running": 0, "waiting": 0}

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def abort(self, rid: str) -> bool:
        self.aborted.append(rid)
        return False

    async def generate_into(self, deliver, prompt=None, sampling_params=None, **kwargs):
        """The server's path (Engine.generate_into): each chunk handed to `deliver`."""
        async for chunk in self.generate_stream(prompt, sampling_params, **kwargs):
            deliver(chunk)

    async def generate_stream(self, prompt=None, sampling_params=None, *, input_ids=None,
                              rid: Optional[str] = None, return_logprob: bool = False,
                              logprob_start_len: int = -1, top_logprobs_num: int = 0):
        tok = self.tokenizer
        prompt_text = tok.decode(input_ids)
        self.prompts.append(prompt_text)
        self.params.append(sampling_params)
        text = self.script(prompt_text)
        ids = tok.encode(text, add_special_tokens=False)
        skip = getattr(sampling_params, "skip_special_tokens", True)
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        for i in range(getattr(sampling_params, "n", 1)):
            shown = ""
            for k, tid in enumerate(ids):
                await asyncio.sleep(0)
                now = tok.decode(ids[:k + 1], skip_special_tokens=skip)
                delta = "" if now.endswith("\ufffd") else now[len(shown):]
                shown += delta
                last = k == len(ids) - 1
                yield StreamChunk(index=i, text=delta, token_ids=[tid], finished=last,
                                  finish_reason={"type": "stop", "matched": eos} if last
                                  else None,
                                  prompt_tokens=len(input_ids) if k in (0, len(ids) - 1)
                                  else None, cached_tokens=0)
