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

    The consumer awaits `next_chunks()` and gets every chunk put since its last call: it
    is woken once per step whatever the number of chunks the step put (n choices, a
    jump-forward), and a chunk costs a list append, not a queue put and a wake-up.

    `collect=True` (Engine.generate, which only wants the totals): deltas are folded into
    `texts` / `ids` per choice and only each choice's final chunk is handed over, so a
    token costs two list appends and no wake-up at all."""

    def __init__(self, rid: str, n: int, collect: bool = False):
        self.rid = rid
        self.n = n
        self.num_finished = 0
        self.reqs: list[Any] = []
        self.collect = collect
        self.texts: list[list[str]] = [[] for _ in range(n)] if collect else []
        self.ids: list[list[int]] = [[] for _ in range(n)] if collect else []
        self.reasons: list[Optional[dict]] = [None] * n if collect else []
        self._chunks: list[StreamChunk] = []
        self._waiter: Optional[asyncio.Future] = None

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
        self._chunks.append(chunk)
        waiter = self._waiter
        if waiter is not None:  # the first chunk since the consumer last looked wakes it
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def next_chunks(self) -> list[StreamChunk]:
        """Every chunk put since the last call, in order; waits until there is one."""
        if not self._chunks:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks, self._chunks = self._chunks, []
        return chunks

    def add_token(self, index: int, text: str, token: int) -> None:
        """A non-final delta of one token (collect mode only)."""
        if text:
            self.texts[index].append(text)
        self.ids[index].append(token)

    @property
    def has_chunks(self) -> bool:
        return bool(self._chunks)

    @property
    def done(self) -> bool:
        """Every choice's final chunk was put (it may not be taken yet)."""
        return self.num_finished >= self.n
