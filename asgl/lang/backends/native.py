"""What the asgl runtime backends share (over HTTP, or in process): `select` by prompt
log-probabilities, and caching a fork's shared prefix.

Subclasses provide `_call` (texts -> outputs with prompt token logprobs), `_stream`, and
`_count_tokens`.

`select` scores each choice by the mean log-probability of its tokens given the prefix
(SGLang's token-length-normalized score). The tokens of `prefix + choice` are not always
the prefix's tokens followed by the choice's: BPE may merge the seam (" " + "calculator"
-> " calculator"). So prompt logprobs start `_SEAM` tokens before the prefix ends, and a
choice's tokens are those from the first position where `prefix + choice` and `prefix`
tokenize differently; positions are aligned from the end of each prompt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from asgl.lang import choices as choices_mod
from asgl.lang.backends.base import Backend, GenResult, Prompt, SelectResult, StreamEvent
from asgl.lang.sampling import split_logprob

_SEAM = 3  # tokens before the end of a prefix that a choice may re-tokenize


@dataclass
class NativeOutput:
    text: str
    meta: dict  # prompt_tokens, completion_tokens, cached_tokens, finish_reason
    input_logprobs: list  # [logprob | None, token_id, text | None] for the last prompt positions
    # SGLang's meta_info logprob entries, when asked for: output_token_logprobs,
    # output_top_logprobs, input_token_logprobs, input_top_logprobs
    logprobs: dict = field(default_factory=dict)


def logprob_options(opts: dict) -> dict[str, Any]:
    """gen's logprob options (sampling.LOGPROB_KEYS) as `_call`'s keyword arguments."""
    if not opts.get("return_logprob"):
        return {}
    return {"return_logprob": True, "logprob_start_len": opts.get("logprob_start_len"),
            "top_logprobs_num": opts.get("top_logprobs_num") or 0,
            "return_text": bool(opts.get("return_text_in_logprobs"))}


class NativeBackend(Backend):
    scores_choices = True

    async def _call(self, texts: list[str], sampling: dict, *, images: list = (),
                    logprob_start_len: Optional[int] = None, return_logprob: bool = False,
                    top_logprobs_num: int = 0, return_text: bool = False,
                    input_ids: Optional[list[list[int]]] = None) -> list[NativeOutput]:
        """One output per text (or per token-id list in `input_ids`). Prompt logprobs from
        `logprob_start_len` (giving it implies `return_logprob`)."""
        raise NotImplementedError

    def _stream(self, text: str, sampling: dict, *, images: list = (), **logprob: Any
                ) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError

    async def _count_tokens(self, text: str) -> int:
        """Prompt tokens of `text` as the runtime tokenizes it (no model work)."""
        out = await self._call([text], {"max_new_tokens": 0})
        return out[0].meta["prompt_tokens"]

    async def generate(self, prompt: Prompt, params: dict) -> GenResult:
        sampling, opts = split_logprob(params)
        out = (await self._call([prompt.text], sampling, images=prompt.images,
                                **logprob_options(opts)))[0]
        return GenResult(out.text, {**out.meta, **out.logprobs})

    async def stream(self, prompt: Prompt, params: dict) -> AsyncIterator[StreamEvent]:
        sampling, opts = split_logprob(params)
        async for event in self._stream(prompt.text, sampling, images=prompt.images,
                                        **logprob_options(opts)):
            yield event

    async def cache_prefix(self, prompt: Prompt) -> Optional[dict]:
        """Prefill `prompt` once (no output) so the radix cache holds it. A request with no
        output tokens and no logprobs is answered without running the model, so ask for
        logprobs (of no prompt position: nothing comes back): that makes the runtime
        compute, and cache, the prompt, in one request."""
        if not prompt.text:
            return None
        out = await self._call([prompt.text], {"max_new_tokens": 0}, images=prompt.images,
                               return_logprob=True)
        return out[0].meta

    async def select(self, prompt: Prompt, choices: list[str], params: dict) -> SelectResult:
        method = params.get("choices_method") or choices_mod.token_length_normalized
        prefix = prompt.text
        n_prefix = await self._count_tokens(prefix) if prefix else 0
        start = max(n_prefix - _SEAM, 0)
        texts = ([prefix] if prefix else []) + [prefix + c for c in choices]
        # One batch: the runtime computes the shared prefix once and the choices after it.
        outs = await self._call(texts, {"max_new_tokens": 0}, images=prompt.images,
                                logprob_start_len=start, return_text=True)
        head = _positions(outs[0]) if prefix else {}
        entries = [_choice_entries(head, n_prefix, out) for out in outs[-len(choices):]]
        scores = [sum(e[0] for e in row) / len(row) if row else -math.inf for row in entries]
        unconditional = None
        if method.needs_unconditional:
            unconditional = await self._unconditional(entries)
        index, meta = method.decide(
            choices=choices, normalized_prompt_logprobs=scores, input_token_logprobs=entries,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional)
        if method is choices_mod.token_length_normalized:
            index = _pick(scores, params.get("temperature", 0.0))
        meta.update({"method": "logprobs", "choices_method": method.name,
                     "normalized_logprobs": scores, "choice_tokens": [len(e) for e in entries],
                     "prompt_tokens": n_prefix, "cached_tokens": outs[0].meta["cached_tokens"]})
        return SelectResult(choices[index], meta)

    async def _unconditional(self, entries: list[list]) -> list[list]:
        """Each choice's tokens scored with nothing before them (the first has no logprob)."""
        ids = [[e[1] for e in row] for row in entries if row]
        outs = iter(await self._call([], {"max_new_tokens": 0}, input_ids=ids,
                                     logprob_start_len=0, return_text=True) if ids else [])
        return [list(next(outs).input_logprobs) if row else [] for row in entries]


def _positions(out: NativeOutput) -> dict[int, int]:
    """Token id by prompt position, for the positions that came back with logprobs."""
    first = out.meta["prompt_tokens"] - len(out.input_logprobs)
    return {first + i: entry[1] for i, entry in enumerate(out.input_logprobs)}


def _choice_entries(head: dict[int, int], n_prefix: int, out: NativeOutput) -> list[list]:
    """[logprob, token_id, text] of the tokens that spell the choice: from the first position
    where this prompt's token differs from the prefix's (or the prefix ends) to the end."""
    n = out.meta["prompt_tokens"]
    first = n - len(out.input_logprobs)
    # Positions before those the prefix came back with are the prefix's (the seam is at
    # most _SEAM tokens): whether a response starts at `logprob_start_len` or one later
    # depends on what the runtime had cached.
    pos = max(first, min(head, default=first))
    while pos < min(n_prefix, n) and head.get(pos) == out.input_logprobs[pos - first][1]:
        pos += 1
    return [list(e) for e in out.input_logprobs[pos - first:] if e[0] is not None]


def _pick(scores: list[float], temperature: float) -> int:
    best = max(range(len(scores)), key=lambda i: scores[i])
    if not temperature or temperature <= 0 or math.isinf(scores[best]):
        return best
    weights = [math.exp((s - scores[best]) / temperature) for s in scores]
    return random.choices(range(len(scores)), weights=weights)[0]
