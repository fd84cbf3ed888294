"""Logit processors that depend on a request's tokens: penalties, logit_bias, min_new_tokens.

Built on the host once per step by `SamplingBatch.from_reqs` (the loop thread), moved to
the device by the worker (`to`), and applied there by the sampler, all in place on the
sampler's private copy of the logits.

- repetition penalty (HF semantics): for every token seen in prompt + output, a positive
  logit is divided by the penalty and a negative one multiplied by it.
- frequency / presence penalties (OpenAI semantics), over output tokens only:
  `logit -= frequency * count + presence * (count > 0)`.
- logit_bias: added to the chosen tokens' logits.
- min_new_tokens: EOS ids and stop_token_ids are set to -inf while the request has fewer
  output tokens than asked for.

Penalty state is rebuilt from the requests' token lists every step: the host side packs a
flat index (`row * vocab_size + token`) of the penalized rows' tokens, and the worker
scatters it into dense [P, V] tensors on the device. That costs a host-to-device copy of
prompt + output ids per penalized request per step; the upgrade for the GPU is an
incremental device-side state (counts kept per request slot, updated by scattering each
step's sampled tokens). With overlap scheduling the batch for step N+1 is built before
step N's token reaches the host, so the counts may lag by that one in-flight token.
"""

from __future__ import annotations

import dataclasses
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from asgl.engine.scheduler.req import Req


def to_device(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """A host tensor on `device`: pinned and non-blocking on CUDA, so no sync. Worker
    thread only (the loop never creates device tensors)."""
    if t is None or t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _flat_index(per_row: list[tuple[list[int], ...]], vocab_size: int
                ) -> Optional[torch.Tensor]:
    """Host tensor of `i * vocab_size + token` for every token of every list in per_row[i].

    Ids are packed with array.extend (C speed; a Python loop per token costs ~10x more on
    long prompts) and the row offsets added with one vectorized op.
    """
    buf, lengths = array("q"), []
    for lists in per_row:
        n = 0
        for ids in lists:
            buf.extend(ids)
            n += len(ids)
        lengths.append(n)
    if not buf:
        return None
    ids = torch.frombuffer(buf, dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(per_row), dtype=torch.int64),
                                   torch.tensor(lengths, dtype=torch.int64),
                                   output_size=len(buf))
    return rows * vocab_size + ids


@dataclass
class PenaltyBatch:
    """Penalty state for the P penalized rows of a batch of S rows.

    On the host `seen_index` / `count_index` hold flat token indices; `to(device)` turns
    them into the dense `seen` / `counts` tensors that `apply` reads."""

    num_rows: int  # P
    vocab_size: int
    rows: Optional[torch.Tensor]  # [P] int64 rows of the logits; None: all S rows, in order
    repetition: Optional[torch.Tensor]  # [P, 1] float32; None: no row uses it
    frequency: Optional[torch.Tensor]  # [P, 1] float32; None with presence: neither is used
    presence: Optional[torch.Tensor]  # [P, 1] float32
    seen_index: Optional[torch.Tensor] = None  # host: flat indices of prompt + output tokens
    count_index: Optional[torch.Tensor] = None  # host: flat indices of output tokens
    seen: Optional[torch.Tensor] = None  # device [P, V] bool: token in prompt + output
    counts: Optional[torch.Tensor] = None  # device [P, V] float32 output-token counts

    @classmethod
    def build(cls, reqs: list["Req"], rows: list[int], num_rows: int,
              vocab_size: int) -> "PenaltyBatch":
        """`reqs[i]` sits at logits row `rows[i]`; `num_rows` is the batch size S."""
        sps = [r.sampling for r in reqs]
        use_rep = any(sp.repetition_penalty != 1.0 for sp in sps)
        use_oai = any(sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0 for sp in sps)
        f32 = torch.float32
        out = cls(num_rows=len(reqs), vocab_size=vocab_size,
                  rows=None if rows == list(range(num_rows)) else torch.tensor(rows),
                  repetition=None, frequency=None, presence=None)
        if use_rep:
            out.seen_index = _flat_index([((r.prompt_ids, r.output_ids)
                                           if sp.repetition_penalty != 1.0 else ())
                                          for r, sp in zip(reqs, sps)], vocab_size)
            out.repetition = torch.tensor([[sp.repetition_penalty] for sp in sps], dtype=f32)
        if use_oai:
            out.count_index = _flat_index([(r.output_ids,) if sp.frequency_penalty != 0.0
                                           or sp.presence_penalty != 0.0 else ()
                                           for r, sp in zip(reqs, sps)], vocab_size)
            out.frequency = torch.tensor([[sp.frequency_penalty] for sp in sps], dtype=f32)
            out.presence = torch.tensor([[sp.presence_penalty] for sp in sps], dtype=f32)
        return out

    def to(self, device: torch.device) -> "PenaltyBatch":
        """The device form: parameters moved, dense `seen` / `counts` scattered there."""
        p, v = self.num_rows, self.vocab_size
        seen = counts = None
        if self.repetition is not None:
            seen = torch.zeros(p * v, dtype=torch.bool, device=device)
            if self.seen_index is not None:
                seen.index_fill_(0, to_device(self.seen_index, device), True)  # (no sync)
            seen = seen.view(p, v)
        if self.frequency is not None:
            counts = torch.zeros(p * v, dtype=torch.float32, device=device)
            if self.count_index is not None:
                flat = to_device(self.count_index, device)
                counts.scatter_add_(0, flat, torch.ones(flat.shape, device=device))
            counts = counts.view(p, v)
        return dataclasses.replace(
            self, rows=to_device(self.rows, device),
            repetition=to_device(self.repetition, device),
            frequency=to_device(self.frequency, device),
            presence=to_device(self.presence, device),
            seen_index=None, count_index=None, seen=seen, counts=counts)

    def apply(self, logits: torch.Tensor) -> None:
        """Penalize `logits` [S, V] in place (device form only)."""
        sub = logits if self.rows is None else logits[self.rows]
        if self.repetition is not None:
            penalized = torch.where(sub > 0, sub / self.repetition, sub * self.repetition)
            sub = torch.where(self.seen, penalized, sub)
        if self.counts is not None:
            sub = sub - (self.frequency * self.counts + self.presence * (self.counts > 0))
        if self.rows is None:
            logits.copy_(sub)
        else:
            logits.index_copy_(0, self.rows, sub)


@dataclass
class SparseLogitEdits:
    """Per-(row, token) edits: logit_bias additions and min_new_tokens bans."""

    bias_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (rows, tokens) [N] each
    bias_values: Optional[torch.Tensor] = None  # [N] float32
    ban_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (rows, tokens) [M] each
    ban_values: Optional[torch.Tensor] = None  # [M] float32, all -inf

    @classmethod
    def build(cls, reqs: list["Req"], out_lens: list[int]) -> Optional["SparseLogitEdits"]:
        """`out_lens[i]`: the output index row i samples now (its count of output tokens)."""
        b_rows, b_toks, b_vals, n_rows, n_toks = [], [], [], [], []
        for i, (r, n_out) in enumerate(zip(reqs, out_lens)):
            sp = r.sampling
            for tok, val in sp.logit_bias_items():
                b_rows.append(i)
                b_toks.append(tok)
                b_vals.append(val)
            if n_out < sp.min_new_tokens:
                banned = set(r.eos_ids).union(sp.stop_token_ids or ())
                n_rows.extend([i] * len(banned))
                n_toks.extend(banned)
        if not b_rows and not n_rows:
            return None
        edits = cls()
        if b_rows:
            edits.bias_index = (torch.tensor(b_rows, dtype=torch.int64),
                                torch.tensor(b_toks, dtype=torch.int64))
            edits.bias_values = torch.tensor(b_vals, dtype=torch.float32)
        if n_rows:
            edits.ban_index = (torch.tensor(n_rows, dtype=torch.int64),
                               torch.tensor(n_toks, dtype=torch.int64))
            edits.ban_values = torch.full((len(n_rows),), float("-inf"))
        return edits

    def to(self, device: torch.device) -> "SparseLogitEdits":
        def pair(ix):
            return None if ix is None else (to_device(ix[0], device), to_device(ix[1], device))
        return SparseLogitEdits(pair(self.bias_index), to_device(self.bias_values, device),
                                pair(self.ban_index), to_device(self.ban_values, device))

    def apply(self, logits: torch.Tensor) -> None:
        if self.bias_index is not None:
            logits.index_put_(self.bias_index, self.bias_values, accumulate=True)
        if self.ban_index is not None:
            # bans come last so that no bias can lift a banned token back
            logits.index_put_(self.ban_index, self.ban_values)
