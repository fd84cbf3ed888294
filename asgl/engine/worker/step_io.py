"""A step's data across the host/device boundary, on the worker thread.

`upload` moves a plan's host index tensors (and the request-table writes) to the device in
one pinned buffer and one copy; `PendingResults` brings the sampled ids, logprobs and
prompt logprobs back as plain lists; `GpuStepStats` measures GPU busy and idle time per
step from CUDA events, without extra host syncs.
"""

from __future__ import annotations

from typing import Optional

import torch

from asgl.engine.contracts.forward_batch import INDEX_FIELDS, PROMPT_LP_FIELDS, ForwardBatch
from asgl.engine.contracts.step import StepOutput
from asgl.engine.sampling.logprobs import compute_prompt_logprobs

_UPLOAD_FIELDS = INDEX_FIELDS + PROMPT_LP_FIELDS


_PAD = torch.zeros(1, dtype=torch.int64)


def upload(batch: ForwardBatch, table_writes, device: torch.device) -> None:
    """Move the batch's host int64 tensors (and the table writes) to `device` in one pinned
    buffer and one non-blocking copy; the fields become views of the device copy."""
    names = [n for n in _UPLOAD_FIELDS if getattr(batch, n) is not None]
    parts = [getattr(batch, n).reshape(-1) for n in names]
    if table_writes is not None:
        parts.extend(table_writes)
    # Every field starts 16-byte aligned (an even int64 offset): Triton specializes kernels
    # on pointer alignment, and a misaligned view would compile another variant mid-run.
    counts = [p.numel() for p in parts]
    chunks: list[torch.Tensor] = []
    for p, n in zip(parts, counts):
        chunks.append(p.to(torch.int64))
        if n % 2:
            chunks.append(_PAD)
    sizes = [n + n % 2 for n in counts]
    pinned = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=True)
    torch.cat(chunks, out=pinned)
    views = [v[:n] for v, n in zip(pinned.to(device, non_blocking=True).split(sizes), counts)]
    for name, view in zip(names, views):
        setattr(batch, name, view)
    if table_writes is not None:
        batch.extra["table_writes"] = views[len(names):]


def timing_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def to_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A pinned host copy, queued now (read after the step's `done` event)."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class PendingResults:
    """One step's results on their way to the host, as plain lists in its StepOutput.

    On CUDA (`start` given) every device result is copied into pinned host memory in stream
    order right after the step, then `done` is recorded; `wait` only synchronizes on that
    event, so it never waits behind a later step that is already queued. On the CPU the
    results are host tensors already and `wait` just converts them."""

    def __init__(self, out: StepOutput, batch: ForwardBatch, logits: torch.Tensor,
                 start: Optional[torch.cuda.Event] = None,
                 stats: Optional["GpuStepStats"] = None, *, decode: bool = False,
                 graph: bool = False):
        self.out, self.start, self.stats = out, start, stats
        self.decode, self.graph = decode, graph
        host = to_host if start is not None else (lambda t: t)
        sample = out.extra_sample
        out.extra_sample = None
        self.ids = None if isinstance(out.next_ids, list) else host(out.next_ids)
        self.logprobs = self.top_ids = self.top_values = self.bad = None
        if sample is not None:
            self.bad = host(sample.bad_rows)
            self.logprobs = host(sample.logprobs)
            self.top_ids = host(sample.top_logprobs_ids)
            self.top_values = host(sample.top_logprobs_values)
        self.prompt = None
        if batch.prompt_lp_rows is not None:
            lp = compute_prompt_logprobs(logits[batch.prompt_lp_rows], batch.prompt_lp_targets,
                                         batch.prompt_lp_topk)
            self.prompt = (host(lp.token_logprobs), host(lp.top_ids), host(lp.top_values))
        self.done = timing_event() if start is not None else None

    def wait(self) -> StepOutput:
        if self.done is not None:
            self.done.synchronize()
        out = self.out
        if self.ids is not None:
            out.next_ids = self.ids.tolist()
        if self.logprobs is not None:
            out.logprobs = self.logprobs.tolist()
        if self.top_ids is not None:
            out.top_ids, out.top_values = self.top_ids.tolist(), self.top_values.tolist()
        if self.prompt is not None:
            values, top_ids, top_values = self.prompt
            out.prompt_logprobs = values.tolist()
            if top_ids is not None:
                out.prompt_top_ids, out.prompt_top_values = top_ids.tolist(), top_values.tolist()
        if self.bad is not None and self.bad.any():  # one op; rows only when some failed
            failed = out.failed_rows or {}
            for row in self.bad.nonzero().view(-1).tolist():
                failed.setdefault(row, "the request's sampling parameters made its logits "
                                       "non-finite (NaN or infinity)")
            out.failed_rows = failed
        if self.stats is not None:
            self.stats.account(self.start, self.done, self.decode, self.graph)
        out.wait = None
        return out


class GpuStepStats:
    """GPU time per step and idle gaps between steps, from CUDA events.

    Each step records `start` right before its first kernel (after host-side planning) and
    `done` after its last copy. Events complete when the GPU reaches them, so
    start(N+1) - done(N) is how long the GPU sat idle waiting for the host between two
    steps (0 when step N+1 was queued before step N finished). Accounted in order, after
    each step's `done`, by the thread that waits for results: no extra host syncs."""

    def __init__(self) -> None:
        self.steps = self.decode_steps = self.graph_steps = 0
        self.extend_steps = self.extend_graph_steps = 0  # prefill / mixed steps
        # benches set a list here to get (decode, graph, busy ms, idle ms before) per step
        self.trace: Optional[list] = None
        self.busy_ms = self.idle_ms = 0.0
        self.decode_busy_ms = self.decode_idle_ms = 0.0
        self._prev_done: Optional[torch.cuda.Event] = None

    def reset(self) -> None:
        self.__init__()

    def account(self, start: torch.cuda.Event, done: torch.cuda.Event, decode: bool,
                graph: bool) -> None:
        busy = start.elapsed_time(done)
        gap = max(self._prev_done.elapsed_time(start), 0.0) if self._prev_done is not None else 0.0
        self._prev_done = done
        if self.trace is not None:
            self.trace.append((decode, graph, round(busy, 2), round(gap, 2)))
        self.steps += 1
        self.busy_ms += busy
        self.idle_ms += gap
        if decode:
            self.decode_steps += 1
            self.graph_steps += int(graph)
            self.decode_busy_ms += busy
            self.decode_idle_ms += gap
        else:
            self.extend_steps += 1
            self.extend_graph_steps += int(graph)

    def summary(self) -> dict:
        total = self.busy_ms + self.idle_ms
        decode_total = self.decode_busy_ms + self.decode_idle_ms
        return {"steps": self.steps, "decode_steps": self.decode_steps,
                "graph_steps": self.graph_steps,
                "graph_share": self.graph_steps / max(self.decode_steps, 1),
                "extend_steps": self.extend_steps, "extend_graph_steps": self.extend_graph_steps,
                "gpu_busy_ms": round(self.busy_ms, 1), "gpu_idle_ms": round(self.idle_ms, 1),
                "gpu_idle_share": self.idle_ms / total if total else 0.0,
                "decode_idle_share": self.decode_idle_ms / decode_total if decode_total else 0.0}
