"""RequestStream: the one channel between the step loop (producer) and the coroutine
awaiting a request (consumer), both on the event loop. Chunks carry deltas only; the
consumer assembles the final output, so the loop never copies a whole text per step.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from asgl.engine.contracts.outputs import StreamChunk


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
