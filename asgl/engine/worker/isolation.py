"""Isolation of a failed sampling step: find the rows whose own request made it fail.

Owner: the worker thread, only after `Sampler.sample` raised for a whole step (never on
the healthy path). The forward pass already succeeded, so its KV is good and only the
draw is redone: the batch is bisected, each part sampled with its rows' parameters alone
(`select_rows`), down to the single rows that still fail. The sampler's rows are
independent (a row's token depends on its own logits, parameters, seed and output index,
never on its neighbours), so every other row gets exactly the token it would have got.

Non-finite logits do not raise: the sampler reports them in `SampleOutput.bad_rows`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from asgl.engine.sampling.batch import SamplingBatch
from asgl.engine.sampling.sampler import SampleOutput

logger = logging.getLogger(__name__)


def sample_isolated(sampler: Any, logits: torch.Tensor, sb: SamplingBatch
                    ) -> tuple[SampleOutput, dict[int, str]]:
    """Sample `logits` [S, V] row group by row group; returns the merged output (failed rows
    hold token 0) and {row: error} for the rows that fail on their own."""
    n = logits.shape[0]
    device = logits.device
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    bad = torch.zeros(n, dtype=torch.bool, device=device)
    lp = top_ids = top_vals = None
    if sb.return_logprob:
        lp = torch.zeros(n, dtype=torch.float32, device=device)
        if sb.top_logprobs_num:
            k = min(sb.top_logprobs_num, logits.shape[1])
            top_ids = torch.zeros((n, k), dtype=torch.int64, device=device)
            top_vals = torch.full((n, k), float("-inf"), dtype=torch.float32, device=device)
    failed: dict[int, str] = {}

    def solve(rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.int64, device=device)
        try:
            out = sampler.sample(logits.index_select(0, index), select_rows(sb, rows))
        except Exception as exc:  # noqa: BLE001 - what we are isolating
            if len(rows) == 1:
                why = f"sampling failed for this request: {type(exc).__name__}: {exc}"
                failed[rows[0]] = why[:500]
                return
            mid = len(rows) // 2
            solve(rows[:mid])
            solve(rows[mid:])
            return
        ids[index] = out.next_token_ids
        if out.bad_rows is not None:
            bad[index] = out.bad_rows
        if lp is not None and out.logprobs is not None:
            lp[index] = out.logprobs
        if top_ids is not None and out.top_logprobs_ids is not None:
            top_ids[index] = out.top_logprobs_ids
            top_vals[index] = out.top_logprobs_values

    solve(list(range(n)))
    if failed:
        logger.error("sampling failed for %d of %d rows (%s); the others were sampled again",
                     len(failed), n, next(iter(failed.values())))
    return SampleOutput(ids, lp, top_ids, top_vals, bad_rows=bad), failed


def select_rows(sb: SamplingBatch, rows: list[int]) -> SamplingBatch:
    """The device-form SamplingBatch of `rows` alone (row i of the result is rows[i])."""
    if len(rows) == sb.size:
        return sb
    device = next((t.device for t in (sb.temperatures, sb.rng_keys) if t is not None), None)
    index = torch.tensor(rows, dtype=torch.int64, device=device)
    moved = {}
    for name in SamplingBatch._TENSORS:
        t = getattr(sb, name)
        moved[name] = None if t is None else t.index_select(0, index.to(t.device))
    remap = torch.full((sb.size,), -1, dtype=torch.int64)
    remap[torch.tensor(rows, dtype=torch.int64)] = torch.arange(len(rows))
    return dataclasses.replace(
        sb, size=len(rows), **moved, penalties=_select_penalties(sb.penalties, remap),
        edits=_select_edits(sb.edits, remap),
        grammar=_GrammarRows(sb.grammar, rows) if sb.grammar is not None else None)


def _select_penalties(pen: Any, remap: torch.Tensor) -> Any:
    if pen is None:
        return None
    rows = (torch.arange(remap.numel()) if pen.rows is None else pen.rows.cpu())
    new_rows = remap[rows]
    keep = (new_rows >= 0).nonzero().view(-1)
    if keep.numel() == 0:
        return None

    def pick(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.index_select(0, keep.to(t.device))

    device = pen.seen.device if pen.seen is not None else pen.counts.device
    return dataclasses.replace(
        pen, num_rows=keep.numel(), rows=new_rows[keep].to(device),
        repetition=pick(pen.repetition), frequency=pick(pen.frequency),
        presence=pick(pen.presence), seen=pick(pen.seen), counts=pick(pen.counts))


def _select_edits(edits: Any, remap: torch.Tensor) -> Any:
    if edits is None:
        return None

    def pick(index, values):
        if index is None:
            return None, None
        rows, toks = index
        new = remap[rows.cpu()]
        keep = (new >= 0).nonzero().view(-1)
        if keep.numel() == 0:
            return None, None
        k = keep.to(rows.device)
        return (new[keep].to(rows.device), toks[k]), values[k]

    bias_index, bias_values = pick(edits.bias_index, edits.bias_values)
    ban_index, ban_values = pick(edits.ban_index, edits.ban_values)
    if bias_index is None and ban_index is None:
        return None
    return type(edits)(bias_index, bias_values, ban_index, ban_values)


class _GrammarRows:
    """A GrammarStep's masks for some of its rows (the same `apply` contract)."""

    def __init__(self, step: Any, rows: list[int]):
        self.step, self.rows = step, rows

    def apply(self, logits: torch.Tensor) -> None:
        # The step's own apply on a zero row per batch row gives -inf exactly where a token
        # is disallowed (the worker may not import the grammar layer; failure path only).
        full = torch.zeros((self.step.bitmask.shape[0], logits.shape[1]),
                           dtype=logits.dtype, device=logits.device)
        self.step.apply(full)
        logits.add_(full[self.rows])
