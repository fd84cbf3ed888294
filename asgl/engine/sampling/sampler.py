"""Sampler: one step's logits -> next token ids, with per-request parameters as tensors.

Owner: the worker thread. The loop builds a host-side `SamplingBatch` once per step
(asgl/engine/sampling/batch.py, rows in the order of `ForwardBatch.sample_rows`); the
worker moves it to the device (`SamplingBatch.to`) and `Sampler.sample` runs there without
syncing with the host (no `.item()` / `.tolist()`): the caller copies `next_token_ids`
back when it wants.

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
from typing import Optional

import torch

from asgl.engine.sampling.batch import SamplingBatch
from asgl.engine.sampling.logprobs import compute_prompt_logprobs, gather_logprobs
from asgl.engine.sampling.rng import counter_uniform, seed_key

__all__ = ["SampleOutput", "Sampler", "SamplingBatch", "compute_prompt_logprobs",
           "counter_uniform", "seed_key"]

# ---------------------------------------------------------------- batch and output
@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # [S] int64, on the device
    logprobs: Optional[torch.Tensor] = None  # [S] float32 of the chosen tokens (raw logits)
    top_logprobs_ids: Optional[torch.Tensor] = None  # [S, K] int64, descending logprob
    top_logprobs_values: Optional[torch.Tensor] = None  # [S, K] float32
    # [S] bool, rows whose processed logits had no finite maximum (NaN, +inf, or every
    # token banned): their token is meaningless and the request must end (engine isolation)
    bad_rows: Optional[torch.Tensor] = None


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

        # A row's own parameters can make its logits non-finite (NaN / +inf from extreme
        # penalties, or nothing allowed). One reduction finds such rows; they are drawn
        # from zeros instead, so the draw below stays in range (an out-of-range gather is a
        # device-side assert on CUDA, fatal to every request) and the caller ends them.
        bad = ~torch.isfinite(logits.amax(dim=-1))

        if sb.all_greedy:  # (an argmax stays in range whatever the row holds)
            ids = torch.argmax(logits, dim=-1)
        else:
            logits = logits.masked_fill(bad.unsqueeze(1), 0.0)
            if self.backend == "flashinfer" and not sb.seeded:
                ids = _draw_flashinfer(logits, sb)
            else:
                ids = self._draw(logits, sb)
            if sb.is_greedy is not None:
                ids = torch.where(sb.is_greedy, torch.argmax(logits, dim=-1), ids)

        out = SampleOutput(ids, bad_rows=bad)
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
