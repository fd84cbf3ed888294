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
    """Chunks of one user request (all its n choices) in arrival order."""

    def __init__(self, rid: str, n: int):
        self.rid = rid
        self.n = n
        self.queue: asyncio.Queue[StreamChunk] = asyncio.Queue()
        self.num_finished = 0
        self.reqs: list[Any] = []

    def put(self, chunk: StreamChunk) -> None:
        if chunk.finished:
            self.num_finished += 1
        self.queue.put_nowait(chunk)

    @property
    def done(self) -> bool:
        return self.num_finished >= self.n
