"""Logit processors that depend on a request's tokens: penalties, logit_bias, min_new_tokens.

Built on the host once per step by `SamplingBatch.from_reqs` and applied on the device by
the sampler, all in place on the sampler's private copy of the logits.

- repetition penalty (HF semantics): for every token seen in prompt + output, a positive
  logit is divided by the penalty and a negative one multiplied by it.
- frequency / presence penalties (OpenAI semantics), over output tokens only:
  `logit -= frequency * count + presence * (count > 0)`.
- logit_bias: added to the chosen tokens' logits.
- min_new_tokens: EOS ids and stop_token_ids are set to -inf while the request has fewer
  output tokens than asked for.

Penalty state is rebuilt from the requests' token lists every step (scatter on the
device from a flat host index list), only for penalized rows. That costs a host-to-device
copy of prompt + output ids per penalized request per step; the upgrade for the GPU is an
incremental device-side state (counts kept per request slot, updated by scattering each
step's sampled tokens). With overlap scheduling the batch for step N+1 is built before
step N's token reaches the host, so the counts may lag by that one in-flight token.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Optional

import torch

from asgl.engine.req import Req


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor: pinned and non-blocking on CUDA, so no sync."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _flat_index(per_row: list[tuple[list[int], ...]], vocab_size: int, device: torch.device
                ) -> Optional[torch.Tensor]:
    """Device tensor of `i * vocab_size + token` for every token of every list in per_row[i].

    Ids are packed with array.extend (C speed; a Python loop per token costs ~10x more on
    long prompts) and the row numbers expanded on the device, without a host sync.
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
    if device.type == "cuda":
        ids = ids.pin_memory().to(device, non_blocking=True)
    row = torch.repeat_interleave(torch.arange(len(per_row), device=device),
                                  host_to_device(lengths, torch.int64, device),
                                  output_size=len(buf))
    return row * vocab_size + ids


@dataclass
class PenaltyBatch:
    """Penalty tensors for the P penalized rows of a batch of S rows."""

    rows: Optional[torch.Tensor]  # [P] int64 rows of the logits; None: all S rows, in order
    repetition: Optional[torch.Tensor]  # [P, 1] float32; None: no row uses it
    seen: Optional[torch.Tensor]  # [P, V] bool: token occurs in prompt + output
    frequency: Optional[torch.Tensor]  # [P, 1] float32; None with presence: neither is used
    presence: Optional[torch.Tensor]  # [P, 1] float32
    counts: Optional[torch.Tensor]  # [P, V] float32 output-token counts

    @classmethod
    def build(cls, reqs: list[Req], rows: list[int], num_rows: int, vocab_size: int,
              device: torch.device) -> "PenaltyBatch":
        """`reqs[i]` sits at logits row `rows[i]`; `num_rows` is the batch size S."""
        sps = [r.sampling for r in reqs]
        use_rep = any(sp.repetition_penalty != 1.0 for sp in sps)
        use_oai = any(sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0 for sp in sps)
        p = len(reqs)

        repetition = seen = frequency = presence = counts = None
        if use_rep:
            seen = torch.zeros(p * vocab_size, dtype=torch.bool, device=device)
            flat = _flat_index([((r.prompt_ids, r.output_ids) if sp.repetition_penalty != 1.0
                                 else ()) for r, sp in zip(reqs, sps)], vocab_size, device)
            if flat is not None:
                seen.index_fill_(0, flat, True)  # (seen[flat] = True syncs on CUDA)
            seen = seen.view(p, vocab_size)
            repetition = host_to_device([[sp.repetition_penalty] for sp in sps], torch.float32,
                                        device)
        if use_oai:
            counts = torch.zeros(p * vocab_size, dtype=torch.float32, device=device)
            flat = _flat_index([(r.output_ids,) if sp.frequency_penalty != 0.0
                                or sp.presence_penalty != 0.0 else ()
                                for r, sp in zip(reqs, sps)], vocab_size, device)
            if flat is not None:
                counts.scatter_add_(0, flat, torch.ones(flat.shape, device=device))
            counts = counts.view(p, vocab_size)
            frequency = host_to_device([[sp.frequency_penalty] for sp in sps], torch.float32,
                                       device)
            presence = host_to_device([[sp.presence_penalty] for sp in sps], torch.float32,
                                      device)
        all_rows = rows == list(range(num_rows))
        return cls(rows=None if all_rows else host_to_device(rows, torch.int64, device),
                   repetition=repetition, seen=seen, frequency=frequency, presence=presence,
                   counts=counts)

    def apply(self, logits: torch.Tensor) -> None:
        """Penalize `logits` [S, V] in place."""
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
    def build(cls, reqs: list[Req], out_lens: list[int], device: torch.device
              ) -> Optional["SparseLogitEdits"]:
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
            edits.bias_index = (host_to_device(b_rows, torch.int64, device),
                                host_to_device(b_toks, torch.int64, device))
            edits.bias_values = host_to_device(b_vals, torch.float32, device)
        if n_rows:
            edits.ban_index = (host_to_device(n_rows, torch.int64, device),
                               host_to_device(n_toks, torch.int64, device))
            edits.ban_values = torch.full((len(n_rows),), float("-inf"), device=device)
        return edits

    def apply(self, logits: torch.Tensor) -> None:
        if self.bias_index is not None:
            logits.index_put_(self.bias_index, self.bias_values, accumulate=True)
        if self.ban_index is not None:
            # bans come last so that no bias can lift a banned token back
            logits.index_put_(self.ban_index, self.ban_values)
