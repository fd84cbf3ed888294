"""RequestStream: the one channel between the step loop (producer) and the coroutine
awaiting a request (consumer), both on the event loop. Chunks carry deltas only; the
consumer assembles the final output, so the loop never copies a whole text per step.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from asgl.engine.contracts.outputs import StreamChunk


class RequestStream:
    """Chunks of one user request (all its n choices) in arrival order.

    The consumer awaits `next_chunks()` and gets every chunk put since its last call: it
    is woken once per step whatever the number of chunks the step put (n choices, a
    jump-forward), and a chunk costs a list append, not a queue put and a wake-up.

    `collect=True` (Engine.generate, which only wants the totals): deltas are folded into
    `texts` / `ids` per choice and only each choice's final chunk is handed over, so a
    token costs two list appends and no wake-up at all.

    `attach(deliver)` (Engine.generate_into, the server's streaming routes): each chunk is
    handed to `deliver` inside the step that produced it, a plain call on the event loop;
    the consumer is woken once, when every choice has finished (or `deliver` raised). An
    exception from `deliver` ends this request only (`error`), never the step."""

    def __init__(self, rid: str, n: int, collect: bool = False, interval: int = 1):
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
        self._deliver: Optional[Callable[[StreamChunk], None]] = None
        self.error: Optional[BaseException] = None
        # --stream-interval (attached streams): a choice's chunks are merged until they
        # hold `interval` tokens; its first chunk and its last go at once
        self.interval = interval
        self._held: dict[int, StreamChunk] = {}
        self._seen: set[int] = set()

    def put(self, chunk: StreamChunk) -> None:
        deliver = self._deliver
        if deliver is not None:
            if self.interval > 1:
                chunk = self._coalesce(chunk)
                if chunk is None:
                    return
            if chunk.finished:
                self.num_finished += 1
            try:
                deliver(chunk)
            except Exception as e:  # this request's consumer failed: it alone ends
                self._deliver = None
                self.error = e
                self.num_finished = self.n  # nothing more is delivered or awaited
            if self.num_finished >= self.n:
                self._wake()
            return
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
        self._wake()  # the first chunk since the consumer last looked wakes it

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _coalesce(self, chunk: StreamChunk) -> Optional[StreamChunk]:
        i = chunk.index
        held = self._held.pop(i, None)
        if held is not None:
            chunk = _merged(held, chunk)
        if chunk.finished or i not in self._seen or len(chunk.token_ids) >= self.interval:
            self._seen.add(i)
            return chunk
        self._held[i] = chunk
        return None

    def attach(self, deliver: Callable[[StreamChunk], None]) -> None:
        """From now on hand each chunk to `deliver` (the chunks put so far first)."""
        pending, self._chunks = self._chunks, []
        self._deliver = deliver
        for chunk in pending:
            if self._deliver is None:
                break
            self.num_finished -= chunk.finished  # put() counts it again
            self.put(chunk)

    async def wait_delivered(self) -> None:
        """Return when every choice's final chunk was delivered; raise what `deliver`
        raised."""
        while self.num_finished < self.n:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.error is not None:
            raise self.error

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


def _merged(a: StreamChunk, b: StreamChunk) -> StreamChunk:
    """`a` then `b` (the same choice) as one chunk."""
    return StreamChunk(
        index=b.index, text=a.text + b.text, token_ids=a.token_ids + b.token_ids,
        finished=b.finished, finish_reason=b.finish_reason,
        logprobs=_joined(a.logprobs, b.logprobs), top_logprobs=_joined(a.top_logprobs,
                                                                       b.top_logprobs),
        prompt_tokens=b.prompt_tokens if b.prompt_tokens is not None else a.prompt_tokens,
        cached_tokens=b.cached_tokens if b.cached_tokens is not None else a.cached_tokens,
        queue_time=b.queue_time if b.queue_time is not None else a.queue_time,
        input_token_logprobs=(b.input_token_logprobs if b.input_token_logprobs is not None
                              else a.input_token_logprobs),
        input_top_logprobs=(b.input_top_logprobs if b.input_top_logprobs is not None
                            else a.input_top_logprobs))


def _joined(a: Optional[list], b: Optional[list]) -> Optional[list]:
    if a is None:
        return b
    return a if b is None else a + b
