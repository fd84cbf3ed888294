"""SamplingBatch: per-row sampling parameters of one step, built on the host.

Owners: the loop builds it once per step, from the running set's arrays
(`from_running`; `from_reqs` builds the same from the requests alone), as CPU tensors
only: the loop thread never creates a device tensor; the worker thread moves it
to its device (`to`) and hands it to the `Sampler`. Rows follow `ForwardBatch.sample_rows`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from asgl.engine.sampling.penalties import PenaltyBatch, SparseLogitEdits, to_device
from asgl.engine.sampling.rng import seed_key

if TYPE_CHECKING:
    from asgl.engine.scheduler.req import Req


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for S rows. Optional tensors are None when no row needs
    them, so `sample` skips that work (the choice is made here, on the host)."""

    size: int
    vocab_size: int
    all_greedy: bool
    is_greedy: Optional[torch.Tensor] = None  # [S] bool; None: no row (or every row) greedy
    temperatures: Optional[torch.Tensor] = None  # [S, 1] float32; 1.0 on greedy rows
    top_ks: Optional[torch.Tensor] = None  # [S, 1] int64; V where off
    top_ps: Optional[torch.Tensor] = None  # [S, 1] float32; +inf where off
    min_ps: Optional[torch.Tensor] = None  # [S, 1] float32; 0 where off
    rng_keys: Optional[torch.Tensor] = None  # [S] int64 from seed_key(req.seed)
    steps: Optional[torch.Tensor] = None  # [S] int64 output index being sampled
    # some request asked for a seed: its draws must not depend on its row (see Sampler)
    seeded: bool = False
    penalties: Optional[PenaltyBatch] = None
    edits: Optional[SparseLogitEdits] = None  # logit_bias and min_new_tokens bans
    return_logprob: bool = False
    top_logprobs_num: int = 0  # K: the most alternatives any row asked for
    # GrammarStep (asgl/engine/grammar/backend.py): token bitmasks of constrained rows, in
    # pinned host memory, filled on the loop while the forward pass runs and copied to the
    # device by the sampler; None when no row is constrained.
    grammar: Optional[Any] = None

    _TENSORS = ("is_greedy", "temperatures", "top_ks", "top_ps", "min_ps", "rng_keys", "steps")

    @property
    def plain_greedy(self) -> bool:
        """Nothing to do but argmax."""
        return (self.all_greedy and self.penalties is None and self.edits is None
                and not self.return_logprob and self.grammar is None)

    def to(self, device: torch.device) -> "SamplingBatch":
        """This batch with every tensor on `device` (worker thread; non-blocking on CUDA).
        Penalty state is expanded to its dense [P, V] form there, never on the host."""
        moved = {name: to_device(getattr(self, name), device) for name in self._TENSORS}
        return dataclasses.replace(
            self, **moved,
            penalties=self.penalties.to(device) if self.penalties is not None else None,
            edits=self.edits.to(device) if self.edits is not None else None)

    @classmethod
    def from_running(cls, running: Any, rows: np.ndarray, steps: np.ndarray,
                     reqs: Sequence["Req"]) -> "SamplingBatch":
        """Row i samples for `reqs[i]`, whose parameters sit at `rows[i]` of the running
        set's arrays (asgl/engine/scheduler/running_set.py), at output index `steps[i]`.

        A fixed number of array operations whatever the batch size; per-request Python
        only when some row needs penalties, logit_bias, min_new_tokens or logprobs."""
        n = len(rows)
        greedy = running.greedy[rows]
        sb = cls(size=n, vocab_size=running.vocab_size, all_greedy=bool(greedy.all()))
        if not sb.all_greedy:
            sb.temperatures = torch.from_numpy(running.temperature[rows].reshape(n, 1))
            if greedy.any():
                sb.is_greedy = torch.from_numpy(greedy)
            top_k = running.top_k[rows]
            if (top_k < running.vocab_size).any():
                sb.top_ks = torch.from_numpy(top_k.reshape(n, 1))
            top_p = running.top_p[rows]
            if np.isfinite(top_p).any():
                sb.top_ps = torch.from_numpy(top_p.reshape(n, 1))
            min_p = running.min_p[rows]
            if (min_p > 0).any():
                sb.min_ps = torch.from_numpy(min_p.reshape(n, 1))
            sb.rng_keys = torch.from_numpy(running.rng_key[rows])
            sb.steps = torch.from_numpy(np.asarray(steps, dtype=np.int64))
            sb.seeded = bool(running.seeded[rows].any())
        if running.slow[rows].any():
            sb._add_token_dependent(list(reqs), np.asarray(steps).tolist())
        return sb

    def _add_token_dependent(self, reqs: list["Req"], out_lens: list[int]) -> None:
        """Penalties, logit_bias / min_new_tokens edits and logprob settings of `reqs`."""
        penalized = [i for i, r in enumerate(reqs) if r.sampling.has_penalties]
        if penalized:
            self.penalties = PenaltyBatch.build([reqs[i] for i in penalized], penalized,
                                                len(reqs), self.vocab_size)
        self.edits = SparseLogitEdits.build(reqs, out_lens)
        self.return_logprob = any(r.return_logprob for r in reqs)
        if self.return_logprob:
            self.top_logprobs_num = max(r.top_logprobs_num if r.return_logprob else 0
                                        for r in reqs)

    @classmethod
    def from_reqs(cls, reqs: Sequence["Req"], vocab_size: int,
                  step_offsets: Optional[Sequence[int]] = None) -> "SamplingBatch":
        """Row i samples for `reqs[i]`, at output index len(output_ids) + step_offsets[i].

        With overlap scheduling the caller passes the number of that request's tokens
        still in flight as its offset; penalty counts then lag by those tokens.
        """
        n = len(reqs)
        offsets = step_offsets if step_offsets is not None else [0] * n
        out_lens = [len(r.output_ids) + off for r, off in zip(reqs, offsets)]
        sps = [r.sampling for r in reqs]
        greedy = [sp.is_greedy for sp in sps]
        sb = cls(size=n, vocab_size=vocab_size, all_greedy=all(greedy))

        if not sb.all_greedy:
            f32, i64 = torch.float32, torch.int64
            # floor: a tiny temperature must not overflow logits / T to inf (NaN softmax)
            sb.temperatures = torch.tensor([[1.0 if g else max(sp.temperature, 1e-5)]
                                            for g, sp in zip(greedy, sps)], dtype=f32)
            if any(greedy):
                sb.is_greedy = torch.tensor(greedy, dtype=torch.bool)
            if any(sp.top_k > 0 for sp in sps):
                sb.top_ks = torch.tensor([[sp.top_k if sp.top_k > 0 else vocab_size]
                                          for sp in sps], dtype=i64)
            if any(sp.top_p < 1.0 for sp in sps):
                # +inf where off, so float error in the cumulative sum never trims such a row
                sb.top_ps = torch.tensor([[sp.top_p if sp.top_p < 1.0 else float("inf")]
                                          for sp in sps], dtype=f32)
            if any(sp.min_p > 0.0 for sp in sps):
                sb.min_ps = torch.tensor([[sp.min_p] for sp in sps], dtype=f32)
            sb.rng_keys = torch.tensor([seed_key(r.seed) for r in reqs], dtype=i64)
            sb.steps = torch.tensor(out_lens, dtype=i64)
            sb.seeded = any(sp.seed is not None for g, sp in zip(greedy, sps) if not g)

        sb._add_token_dependent(list(reqs), out_lens)
        return sb
