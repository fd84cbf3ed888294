"""Generation: one engine request as the server drives it.

Every route (native or OpenAI, streaming or not) runs its engine requests through here,
so the whole server has one code path for: taking the engine's chunks
(`Engine.generate_into`: each chunk is handed over inside the step that made it, so a
streaming route renders and writes its event there, with no task wake-up per request per
step), assembling each choice (text, ids, logprobs), per-request metrics (TTFT,
inter-token latency, queue time, end-to-end latency, token counters), and aborting. Abort
needs no code of its own: a client that disconnects cancels the handler (aiohttp handler
cancellation), the cancellation reaches `generate_into`, which aborts the request; a
write that fails ends that request the same way.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from asgl.engine.contracts.outputs import StreamChunk
from asgl.engine.contracts.sampling_params import SamplingParams
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
    mm: Any = None  # the prompt's images (MMInputs; input_ids already expanded for them)


class Choice:
    """One generated sequence, assembled from stream deltas."""
    __slots__ = ("index", "parts", "output_ids", "finish_reason", "logprobs", "top_logprobs",
                 "prompt_tokens", "cached_tokens", "input_logprobs", "input_top_logprobs",
                 "last_token_time", "first_token_time")

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
        self.first_token_time: Optional[float] = None

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

    @property
    def done(self) -> bool:
        return self.num_finished == len(self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.output_ids) for c in self.choices)

    async def deliver(self, on_chunk: Callable[[StreamChunk], None]) -> None:
        """Hand each chunk, recorded into `choices` first, to `on_chunk` inside the engine
        step that produced it (Engine.generate_into): the streaming routes render and write
        their events from there, with no task wake-up per request per step."""
        job, engine, metrics = self.job, self.state.engine, self.state.metrics
        extra = {"mm_inputs": job.mm} if job.mm is not None else {}
        counted = 0
        accepted = False

        def take(chunk: StreamChunk) -> None:
            nonlocal counted, accepted
            if not accepted:
                accepted = True
                metrics.prompt_tokens.inc(len(job.input_ids))
            self._record(chunk)
            counted += len(chunk.token_ids)
            on_chunk(chunk)

        try:
            await engine.generate_into(
                take, input_ids=job.input_ids, sampling_params=job.params, rid=job.rid,
                return_logprob=job.return_logprob, logprob_start_len=job.logprob_start_len,
                top_logprobs_num=job.top_logprobs_num, **extra)
        finally:
            if counted:
                metrics.generation_tokens.inc(counted)

    async def run(self) -> list[Choice]:
        """To completion: the chunks are only recorded (no wake-up until the end)."""
        await self.deliver(_ignore)
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
            if choice.first_token_time is None:
                choice.first_token_time = now
            choice.output_ids.extend(chunk.token_ids)
        if chunk.text:
            choice.parts.append(chunk.text)
        if chunk.logprobs:
            choice.logprobs.extend(chunk.logprobs)
        if chunk.top_logprobs:
            choice.top_logprobs.extend(chunk.top_logprobs)
        if chunk.prompt_tokens is not None:  # request facts ride on first and last chunks
            choice.prompt_tokens = chunk.prompt_tokens
            choice.cached_tokens = chunk.cached_tokens or 0
        if chunk.input_token_logprobs is not None:
            choice.input_logprobs = chunk.input_token_logprobs
            choice.input_top_logprobs = chunk.input_top_logprobs
        if chunk.finished:
            choice.finish_reason = chunk.finish_reason
            metrics = self.state.metrics
            if chunk.queue_time is not None:
                metrics.queue_time.observe(chunk.queue_time)
            metrics.finished.labels((chunk.finish_reason or {}).get("type", "stop")).inc()
            if len(choice.output_ids) > 1:  # time per output token after the first
                metrics.tpot.observe((choice.last_token_time - choice.first_token_time)
                                     / (len(choice.output_ids) - 1))
            self.num_finished += 1
            if self.done:
                self.state.metrics.e2e.observe(now - self.arrival)


def _ignore(chunk: StreamChunk) -> None:
    pass


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


async def deliver_all(gens: list[Generation],
                      on_chunk: Callable[[int, StreamChunk], None]) -> None:
    """Every generation's chunks to `on_chunk(generation index, chunk)` as the steps make
    them; if one fails or we are cancelled, abort the rest."""
    if len(gens) == 1:
        await gens[0].deliver(functools.partial(on_chunk, 0))
        return
    tasks = [asyncio.ensure_future(g.deliver(functools.partial(on_chunk, k)))
             for k, g in enumerate(gens)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
