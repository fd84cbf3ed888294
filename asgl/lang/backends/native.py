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
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from asgl.lang.backends.base import Backend, GenResult, Prompt, SelectResult, StreamEvent

_SEAM = 3  # tokens before the end of a prefix that a choice may re-tokenize


@dataclass
class NativeOutput:
    text: str
    meta: dict  # prompt_tokens, completion_tokens, cached_tokens, finish_reason
    input_logprobs: list  # (logprob | None, token_id) for the last prompt positions


class NativeBackend(Backend):
    async def _call(self, texts: list[str], sampling: dict, *, images: list = (),
                    logprob_start_len: Optional[int] = None) -> list[NativeOutput]:
        raise NotImplementedError

    def _stream(self, text: str, sampling: dict, *, images: list = ()
                ) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError

    async def _count_tokens(self, text: str) -> int:
        """Prompt tokens of `text` as the runtime tokenizes it (no model work)."""
        out = await self._call([text], {"max_new_tokens": 0})
        return out[0].meta["prompt_tokens"]

    async def generate(self, prompt: Prompt, params: dict) -> GenResult:
        out = (await self._call([prompt.text], params, images=prompt.images))[0]
        return GenResult(out.text, out.meta)

    async def stream(self, prompt: Prompt, params: dict) -> AsyncIterator[StreamEvent]:
        async for event in self._stream(prompt.text, params, images=prompt.images):
            yield event

    async def cache_prefix(self, prompt: Prompt) -> Optional[dict]:
        """Prefill `prompt` once (no output) so the radix cache holds it. A request with no
        output tokens and no logprobs is answered without running the model, so ask for the
        last prompt token's logprob: that makes the runtime compute (and cache) the prompt."""
        if not prompt.text:
            return None
        n = await self._count_tokens(prompt.text)
        out = await self._call([prompt.text], {"max_new_tokens": 0}, images=prompt.images,
                               logprob_start_len=n - 1)
        return out[0].meta

    async def select(self, prompt: Prompt, choices: list[str], params: dict) -> SelectResult:
        prefix = prompt.text
        n_prefix = await self._count_tokens(prefix) if prefix else 0
        start = max(n_prefix - _SEAM, 0)
        texts = ([prefix] if prefix else []) + [prefix + c for c in choices]
        # One batch: the runtime computes the shared prefix once and the choices after it.
        outs = await self._call(texts, {"max_new_tokens": 0}, images=prompt.images,
                                logprob_start_len=start)
        head = _positions(outs[0]) if prefix else {}
        scores, counts = [], []
        for out in outs[-len(choices):]:
            lps = _choice_logprobs(head, n_prefix, out)
            counts.append(len(lps))
            scores.append(sum(lps) / len(lps) if lps else -math.inf)
        index = _pick(scores, params.get("temperature", 0.0))
        meta = {"method": "logprobs", "normalized_logprobs": scores, "choice_tokens": counts,
                "prompt_tokens": n_prefix, "cached_tokens": outs[0].meta["cached_tokens"]}
        return SelectResult(choices[index], meta)


def _positions(out: NativeOutput) -> dict[int, int]:
    """Token id by prompt position, for the positions that came back with logprobs."""
    first = out.meta["prompt_tokens"] - len(out.input_logprobs)
    return {first + i: tid for i, (_, tid) in enumerate(out.input_logprobs)}


def _choice_logprobs(head: dict[int, int], n_prefix: int, out: NativeOutput) -> list[float]:
    """Logprobs of the tokens that spell the choice: from the first position where this
    prompt's token differs from the prefix's (or the prefix ends) to the end."""
    n = out.meta["prompt_tokens"]
    first = n - len(out.input_logprobs)
    # Positions before those the prefix came back with are the prefix's (the seam is at
    # most _SEAM tokens): whether a response starts at `logprob_start_len` or one later
    # depends on what the runtime had cached.
    pos = max(first, min(head, default=first))
    while pos < min(n_prefix, n) and head.get(pos) == out.input_logprobs[pos - first][1]:
        pos += 1
    return [lp for lp, _ in out.input_logprobs[pos - first:] if lp is not None]


def _pick(scores: list[float], temperature: float) -> int:
    best = max(range(len(scores)), key=lambda i: scores[i])
    if not temperature or temperature <= 0 or math.isinf(scores[best]):
        return best
    weights = [math.exp((s - scores[best]) / temperature) for s in scores]
    return random.choices(range(len(scores)), weights=weights)[0]
