"""Generation: one engine request as the server drives it.

Every route (native or OpenAI, streaming or not) runs its engine requests through here,
so the whole server has one code path for: consuming `Engine.generate_stream`, assembling
each choice (text, ids, logprobs), per-request metrics (TTFT, inter-token latency, queue
time, end-to-end latency, token counters), and aborting. Abort needs no code of its own:
a client that disconnects cancels the handler (aiohttp handler cancellation), the
cancellation reaches the engine's generator, and its `finally` aborts the request; a
handler that stops reading closes the generator (`aclosing`), which does the same.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from asgl.engine.outputs import StreamChunk
from asgl.engine.sampling_params import SamplingParams
from asgl.server.state import ServerState


@dataclass
class Job:
    """One prompt with its parameters: one engine request (n choices)."""
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0


class Choice:
    """One generated sequence, assembled from stream deltas."""
    __slots__ = ("index", "parts", "output_ids", "finish_reason", "logprobs", "top_logprobs",
                 "prompt_tokens", "cached_tokens", "input_logprobs", "input_top_logprobs",
                 "last_token_time", "started")

    def __init__(self, index: int, prompt_tokens: int):
        self.index = index
        self.parts: list[str] = []
        self.output_ids: list[int] = []
        self.finish_reason: Optional[dict] = None
        self.logprobs: list = []  # (logprob, token_id) per output token
        self.top_logprobs: list = []  # [(logprob, token_id), ...] per output token
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.input_logprobs: Optional[list] = None  # (logprob | None, token_id) per prompt token
        self.input_top_logprobs: Optional[list] = None
        self.last_token_time: Optional[float] = None
        self.started = False  # has a chunk arrived

    @property
    def text(self) -> str:
        if len(self.parts) > 1:  # join once, keep the result
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


class Generation:
    def __init__(self, state: ServerState, job: Job, arrival: float):
        self.state = state
        self.job = job
        self.arrival = arrival  # time.monotonic() when the HTTP request came in
        self.choices = [Choice(i, len(job.input_ids)) for i in range(job.params.n)]
        self.num_finished = 0
        self.first_token_time: Optional[float] = None
        self._reqs: Optional[list] = None

    @property
    def done(self) -> bool:
        return self.num_finished == len(self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.output_ids) for c in self.choices)

    async def events(self) -> AsyncIterator[StreamChunk]:
        """The engine's chunks, each recorded into `choices` before it is yielded."""
        job, engine, metrics = self.job, self.state.engine, self.state.metrics
        stream = engine.generate_stream(
            input_ids=job.input_ids, sampling_params=job.params, rid=job.rid,
            return_logprob=job.return_logprob, logprob_start_len=job.logprob_start_len,
            top_logprobs_num=job.top_logprobs_num)
        counted = 0
        try:
            async with aclosing(stream):
                async for chunk in stream:
                    if self._reqs is None:  # the request was accepted: count its prompt
                        self._reqs = _engine_reqs(engine, job.rid)
                        metrics.prompt_tokens.inc(len(job.input_ids))
                    choice = self.choices[chunk.index]
                    if not choice.started:  # prompt facts are final once output begins
                        choice.started = True
                        self._capture(choice)
                    self._record(chunk)
                    counted += len(chunk.token_ids)
                    yield chunk
        finally:
            if counted:
                metrics.generation_tokens.inc(counted)

    async def run(self) -> list[Choice]:
        async with aclosing(self.events()) as chunks:
            async for _ in chunks:
                pass
        return self.choices

    def _record(self, chunk: StreamChunk) -> None:
        choice = self.choices[chunk.index]
        now = time.monotonic()
        if chunk.token_ids:
            metrics = self.state.metrics
            if self.first_token_time is None:
                self.first_token_time = now
                metrics.ttft.observe(now - self.arrival)
            if choice.last_token_time is not None:
                metrics.itl.observe((now - choice.last_token_time) / len(chunk.token_ids))
            choice.last_token_time = now
            choice.output_ids.extend(chunk.token_ids)
        if chunk.text:
            choice.parts.append(chunk.text)
        if chunk.logprobs:
            choice.logprobs.extend(chunk.logprobs)
        if chunk.top_logprobs:
            choice.top_logprobs.extend(chunk.top_logprobs)
        if chunk.finished:
            choice.finish_reason = chunk.finish_reason
            self._capture(choice)
            self._observe_queue_time(choice)
            self.num_finished += 1
            if self.done:
                self.state.metrics.e2e.observe(now - self.arrival)

    def _req(self, choice: Choice) -> Any:
        reqs = self._reqs
        return reqs[choice.index] if reqs and choice.index < len(reqs) else None

    def _capture(self, choice: Choice) -> None:
        """Copy what only the engine's request knows (cached tokens, prompt logprobs) while
        the engine still holds it."""
        req = self._req(choice)
        if req is None:
            return
        choice.prompt_tokens = len(req.prompt_ids)
        choice.cached_tokens = req.num_cached
        if req.return_logprob and req.logprob_start_len >= 0:
            first = [(None, req.prompt_ids[0])] if req.logprob_start_len == 0 else []
            choice.input_logprobs = first + list(req.prompt_logprobs)
            if req.top_logprobs_num:
                choice.input_top_logprobs = [None] * len(first) + list(req.prompt_top_logprobs)

    def _observe_queue_time(self, choice: Choice) -> None:
        req = self._req(choice)
        scheduled = getattr(req, "first_scheduled_time", None)  # see _engine_reqs
        if req is not None and scheduled is not None:
            self.state.metrics.queue_time.observe(max(0.0, scheduled - req.arrival_time))


def _engine_reqs(engine: Any, rid: str) -> Optional[list]:
    """The engine's `Req` objects of request `rid` (one per choice), or None.

    StreamChunk carries no per-request facts (prompt/cached token counts, prompt
    logprobs), so we read them from the engine's request table while the request is
    live. This is the only place the server looks inside the engine.
    """
    stream = getattr(engine, "_streams", {}).get(rid)
    return list(stream.reqs) if stream is not None else None


async def run_all(gens: list[Generation]) -> None:
    """Run generations concurrently; if one fails or we are cancelled, abort the rest."""
    if len(gens) == 1:
        await gens[0].run()
        return
    tasks = [asyncio.ensure_future(g.run()) for g in gens]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merged_events(gens: list[Generation]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """(generation index, chunk) from all generations, in arrival order."""
    if len(gens) == 1:
        async with aclosing(gens[0].events()) as chunks:
            async for chunk in chunks:
                yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    _END = object()

    async def pump(k: int, gen: Generation) -> None:
        try:
            async with aclosing(gen.events()) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((k, chunk))
            queue.put_nowait((k, _END))
        except Exception as e:  # hand it to the consumer; cancellation just ends the pump
            queue.put_nowait((k, e))

    tasks = [asyncio.ensure_future(pump(k, g)) for k, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            k, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
