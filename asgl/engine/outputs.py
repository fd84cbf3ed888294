"""What the engine hands back to callers: final outputs and stream chunks.

A `RequestStream` is the one channel between the scheduler (producer, on the event loop)
and the coroutine awaiting a request (consumer). Chunks carry deltas only; the consumer
assembles the final output, so the scheduler never copies a whole text per step.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import msgspec


class StreamChunk(msgspec.Struct, omit_defaults=True):
    index: int  # which of the request's n choices
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new token ids
    finished: bool = False
    finish_reason: Optional[dict] = None
    # (logprob, token_id) per new token, and its top alternatives [(logprob, token_id), ...]
    logprobs: Optional[list] = None
    top_logprobs: Optional[list] = None
    # Facts of the request, on each choice's first chunk (and again on its last one):
    # prompt length, prompt tokens served by the prefix cache, seconds spent queued.
    prompt_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    queue_time: Optional[float] = None
    # Prompt logprobs (when asked for), on each choice's last chunk.
    input_token_logprobs: Optional[list] = None
    input_top_logprobs: Optional[list] = None


class GenerateOutput(msgspec.Struct, omit_defaults=True):
    rid: str
    index: int
    text: str
    output_ids: list[int]
    finish_reason: Optional[dict]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    output_token_logprobs: Optional[list] = None
    output_top_logprobs: Optional[list] = None
    input_token_logprobs: Optional[list] = None
    input_top_logprobs: Optional[list] = None


class RequestStream:
    """Chunks of one user request (all its n choices) in arrival order.

    `collect=True` (Engine.generate, which only wants the totals): deltas are folded into
    `texts` / `ids` per choice and only each choice's final chunk goes through the queue,
    so a token costs two list appends instead of a chunk, a queue put and a consumer
    wake-up on the event loop."""

    def __init__(self, rid: str, n: int, collect: bool = False):
        self.rid = rid
        self.n = n
        self.queue: asyncio.Queue[StreamChunk] = asyncio.Queue()
        self.num_finished = 0
        self.reqs: list[Any] = []
        self.collect = collect
        self.texts: list[list[str]] = [[] for _ in range(n)] if collect else []
        self.ids: list[list[int]] = [[] for _ in range(n)] if collect else []
        self.reasons: list[Optional[dict]] = [None] * n if collect else []

    def put(self, chunk: StreamChunk) -> None:
        if self.collect:
            if chunk.text:
                self.texts[chunk.index].append(chunk.text)
            self.ids[chunk.index].extend(chunk.token_ids)
            if not chunk.finished:
                return
            self.reasons[chunk.index] = chunk.finish_reason
        if chunk.finished:
            self.num_finished += 1
        self.queue.put_nowait(chunk)

    def add_token(self, index: int, text: str, token: int) -> None:
        """A non-final delta of one token (collect mode only)."""
        if text:
            self.texts[index].append(text)
        self.ids[index].append(token)

    @property
    def done(self) -> bool:
        return self.num_finished >= self.n
