"""Sampler: one step's logits -> next token ids, with per-request parameters as tensors.

Owner: the scheduler builds a `SamplingBatch` once per step (`SamplingBatch.from_reqs`, on
the event loop, rows in the order of `ForwardBatch.sample_rows`) and hands it to the worker
with the ForwardBatch; `Sampler.sample` runs in the worker thread and never syncs with the
host (no `.item()` / `.tolist()`): the caller copies `next_token_ids` back when it wants.

Order of work on a row: penalties -> logit_bias -> min_new_tokens bans -> grammar mask ->
greedy argmax, or temperature -> softmax -> top_k -> top_p (on the top-k-renormalized
mass) -> min_p (relative to the top probability) -> inverse-CDF draw. A row's result
depends only on its own logits and parameters, never on which other rows share the batch.

Randomness is counter-based: a row's uniform is a pure function of (req.seed, output
index), computed with integer tensor ops on the device. A seeded request therefore gets the
same tokens alone or in any batch, at any row, after a retraction and with overlap
scheduling. Greedy rows never use it. Requests that share a seed (n > 1) share their
draws: the engine gives each of them its own seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from asgl.engine.logprobs import compute_prompt_logprobs, gather_logprobs
from asgl.engine.penalties import PenaltyBatch, SparseLogitEdits, host_to_device
from asgl.engine.req import Req

__all__ = ["SampleOutput", "Sampler", "SamplingBatch", "compute_prompt_logprobs",
           "counter_uniform", "seed_key"]

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


# ---------------------------------------------------------------- counter-based RNG
def seed_key(seed: int) -> int:
    """Two 32-bit keys from a 64-bit seed (splitmix64 finalizer), packed as a signed int64.

    Done on the host once per row: it keeps the device-side hash down to two rounds.
    """
    z = (seed + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit xorshift-multiply hash (constants from Wellons' hash prospector).

    x < 2**32 and both multipliers < 2**31, so no product reaches 2**63: exact in int64.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def counter_uniform(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) as float32 [S]: hash(key, step), one per row, on keys' device.

    `keys` are `seed_key(seed)` values, `steps` the output index being sampled.
    Two independent keys keep (key, step) pairs with equal `key ^ step` from colliding.
    """
    key_a = keys & _M32
    key_b = (keys >> 32) & _M32  # arithmetic shift, then mask: the high word unsigned
    h = _mix32(_mix32((steps & _M32) ^ key_a) ^ key_b)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 bits: exact in float32


# ---------------------------------------------------------------- batch and output
@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # [S] int64, on the device
    logprobs: Optional[torch.Tensor] = None  # [S] float32 of the chosen tokens (raw logits)
    top_logprobs_ids: Optional[torch.Tensor] = None  # [S, K] int64, descending logprob
    top_logprobs_values: Optional[torch.Tensor] = None  # [S, K] float32


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
    # GrammarStep (asgl/engine/grammar.py): token bitmasks of constrained rows, filled on
    # the loop while the forward pass runs; None when no row is constrained.
    grammar: Optional[Any] = None

    @property
    def plain_greedy(self) -> bool:
        """Nothing to do but argmax."""
        return (self.all_greedy and self.penalties is None and self.edits is None
                and not self.return_logprob and self.grammar is None)

    @classmethod
    def from_reqs(cls, reqs: Sequence[Req], vocab_size: int, device: torch.device | str,
                  step_offsets: Optional[Sequence[int]] = None) -> "SamplingBatch":
        """Row i samples for `reqs[i]`, at output index len(output_ids) + step_offsets[i].

        With overlap scheduling the caller passes the number of that request's tokens
        still in flight as its offset; penalty counts then lag by those tokens.
        """
        device = torch.device(device)
        n = len(reqs)
        offsets = step_offsets if step_offsets is not None else [0] * n
        out_lens = [len(r.output_ids) + off for r, off in zip(reqs, offsets)]
        sps = [r.sampling for r in reqs]
        greedy = [sp.is_greedy for sp in sps]
        sb = cls(size=n, vocab_size=vocab_size, all_greedy=all(greedy))

        if not sb.all_greedy:
            h2d = host_to_device
            # floor: a tiny temperature must not overflow logits / T to inf (NaN softmax)
            sb.temperatures = h2d([[1.0 if g else max(sp.temperature, 1e-5)]
                                   for g, sp in zip(greedy, sps)], torch.float32, device)
            if any(greedy):
                sb.is_greedy = h2d(greedy, torch.bool, device)
            if any(sp.top_k > 0 for sp in sps):
                sb.top_ks = h2d([[sp.top_k if sp.top_k > 0 else vocab_size] for sp in sps],
                                torch.int64, device)
            if any(sp.top_p < 1.0 for sp in sps):
                # +inf where off, so float error in the cumulative sum never trims such a row
                sb.top_ps = h2d([[sp.top_p if sp.top_p < 1.0 else float("inf")] for sp in sps],
                                torch.float32, device)
            if any(sp.min_p > 0.0 for sp in sps):
                sb.min_ps = h2d([[sp.min_p] for sp in sps], torch.float32, device)
            sb.rng_keys = h2d([seed_key(r.seed) for r in reqs], torch.int64, device)
            sb.steps = h2d(out_lens, torch.int64, device)
            sb.seeded = any(sp.seed is not None for g, sp in zip(greedy, sps) if not g)

        penalized = [i for i, sp in enumerate(sps) if sp.has_penalties]
        if penalized:
            sb.penalties = PenaltyBatch.build([reqs[i] for i in penalized], penalized, n,
                                              vocab_size, device)
        sb.edits = SparseLogitEdits.build(list(reqs), out_lens, device)
        sb.return_logprob = any(r.return_logprob for r in reqs)
        if sb.return_logprob:
            sb.top_logprobs_num = max(r.top_logprobs_num if r.return_logprob else 0 for r in reqs)
        return sb


# ---------------------------------------------------------------- the sampler
class Sampler:
    """One per worker. `logits` is never modified.

    backend "pytorch": the draw below (a sort, then the inverse CDF at a counter-based
    uniform): a row's token depends only on its logits, its seed and its output index.
    backend "flashinfer" (CUDA): FlashInfer's rejection-sampling kernels (top-k / top-p /
    min-p without a sort), fed the same per-row seed and output index; FlashInfer also
    mixes in the row's position, so a batch in which a request asked for a seed falls back
    to the pytorch draw (as vLLM does for per-request generators)."""

    def __init__(self, backend: str = "pytorch"):
        self.backend = backend
        if backend == "flashinfer":
            from asgl.kernels.attention.flashinfer_backend import reuse_prebuilt_modules

            reuse_prebuilt_modules()

    def sample(self, logits: torch.Tensor, sb: SamplingBatch) -> SampleOutput:
        """`logits` [S, vocab_size] float32 (rows in the batch's order) -> SampleOutput.

        No host syncs; `logits` is left as it was."""
        if sb.plain_greedy:  # the hot path: nothing but the argmax
            return SampleOutput(torch.argmax(logits, dim=-1))
        raw = logits.float()
        logits = raw
        if sb.penalties is not None or sb.edits is not None or sb.grammar is not None:
            logits = raw.clone()
            if sb.penalties is not None:
                sb.penalties.apply(logits)
            if sb.edits is not None:
                sb.edits.apply(logits)
            if sb.grammar is not None:  # last: nothing may lift a disallowed token again
                sb.grammar.apply(logits)

        if sb.all_greedy:
            ids = torch.argmax(logits, dim=-1)
        else:
            if self.backend == "flashinfer" and not sb.seeded:
                ids = _draw_flashinfer(logits, sb)
            else:
                ids = self._draw(logits, sb)
            if sb.is_greedy is not None:
                ids = torch.where(sb.is_greedy, torch.argmax(logits, dim=-1), ids)

        out = SampleOutput(ids)
        if sb.return_logprob:
            lp = gather_logprobs(torch.log_softmax(raw, dim=-1), ids, sb.top_logprobs_num)
            out.logprobs, out.top_logprobs_ids, out.top_logprobs_values = lp
        return out

    @staticmethod
    def _draw(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
        """Filter each row's distribution, then invert its CDF at the row's uniform.

        Sorting makes every filter a mask on a prefix of ranks; kept tokens are always a
        prefix of the sorted order. (A GPU kernel can do this without a full sort.)
        """
        probs = torch.softmax(logits / sb.temperatures, dim=-1)
        p, order = probs.sort(dim=-1, descending=True, stable=True)
        if sb.top_ks is not None:
            ranks = torch.arange(p.shape[-1], device=p.device)
            p.masked_fill_(ranks >= sb.top_ks, 0.0)
        if sb.top_ps is not None:
            cum = p.cumsum(dim=-1)
            # drop a token when the mass strictly before it already reaches top_p
            p.masked_fill_(cum - p > sb.top_ps * cum[:, -1:], 0.0)
        if sb.min_ps is not None:
            p.masked_fill_(p < sb.min_ps * p[:, :1], 0.0)

        cdf = p.cumsum(dim=-1)
        u = counter_uniform(sb.rng_keys, sb.steps)
        target = (u * cdf[:, -1]).unsqueeze(1)
        pos = torch.searchsorted(cdf, target, right=True)  # first rank whose cdf > target
        # float rounding can put target at the very top: clamp to the last kept rank
        last_kept = (p > 0).sum(dim=-1, keepdim=True) - 1
        pos = torch.minimum(pos, last_kept)
        return order.gather(1, pos).view(-1)


def _draw_flashinfer(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """The same filters as `Sampler._draw` (top-k, then top-p on the top-k-renormalized
    mass, then min-p relative to the top probability), by FlashInfer's kernels: rejection
    sampling over the unsorted probabilities, no host sync."""
    from flashinfer import sampling as fis

    probs = torch.softmax(logits / sb.temperatures, dim=-1)
    # Philox offsets 256 numbers apart per output index: a step's rejection rounds never
    # reuse the next step's randomness
    seed, offset = sb.rng_keys, sb.steps * 256
    top_k = sb.top_ks.view(-1).to(torch.int32) if sb.top_ks is not None else None
    # +inf marks "off" in the pytorch path; FlashInfer wants a probability
    top_p = sb.top_ps.view(-1).clamp(max=1.0) if sb.top_ps is not None else None
    if sb.min_ps is not None:
        if top_k is not None:
            probs = fis.top_k_renorm_probs(probs, top_k)
        if top_p is not None:
            probs = fis.top_p_renorm_probs(probs, top_p)
        ids = fis.min_p_sampling_from_probs(probs, sb.min_ps.view(-1), seed=seed, offset=offset)
    elif top_k is not None or top_p is not None:
        ids = fis.top_k_top_p_sampling_from_probs(
            probs, top_k if top_k is not None else probs.shape[-1],
            top_p if top_p is not None else 1.0, filter_apply_order="top_k_first",
            seed=seed, offset=offset)
    else:
        ids = fis.sampling_from_probs(probs, seed=seed, offset=offset)
    return ids.to(torch.int64)
