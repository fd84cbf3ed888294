"""ForwardBatch: everything one forward pass needs.

Owners, in order: the scheduler builds it with host tensors (`ForwardBatch.build`) on the
loop thread; the worker thread uploads it (its tensor fields become device views, see
asgl/engine/worker/step_io.py) and attaches the request table, KV pool and attention
backend; the backend's `prepare` writes its per-step state into `attn_state`; the model
and the attention layers then only read it.

Layout: B requests, T = sum(extend_lens) new tokens, flattened without padding.
Request i owns tokens [extend_start_loc[i], extend_start_loc[i] + extend_lens[i]) of
`input_ids`/`positions`/`out_cache_loc`; its KV after this step covers positions
[0, seq_lens[i]) and lives at `req_to_token[req_pool_indices[i], :seq_lens[i]]`, of which
the first `prefix_lens[i]` were already in the pool (radix-cache hit, earlier chunks, or
earlier decode steps).

A decode request is simply one with extend_len == 1; MIXED batches hold both kinds.
Encoder models (no KV cache) run with `kv_pool=None` and `out_cache_loc=None`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from asgl.engine.worker.kv_cache import KVPool
    from asgl.engine.contracts.attention import AttentionBackend


IntSeq = Union[Sequence[int], np.ndarray]


# The int64 index tensors of a batch, in one fixed order: what the worker uploads in one
# pinned copy and what rank 0 broadcasts to the other TP ranks (which skip the prompt-
# logprob fields: only the sampling rank reads them).
INDEX_FIELDS = ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens",
                "prefix_lens", "extend_lens", "extend_start_loc", "logits_indices", "sample_rows")
PROMPT_LP_FIELDS = ("prompt_lp_rows", "prompt_lp_targets")


class ForwardMode(enum.IntEnum):
    EXTEND = 1  # every request brings >= 1 new prompt token (prefill / chunk / prefix hit)
    DECODE = 2  # every request brings exactly one token that was sampled last step
    MIXED = 3  # both kinds in one pass (chunked prefill alongside decodes)
    ENCODE = 4  # non-causal encoder pass without KV cache (embedding models)

    @property
    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE


@dataclass
class ForwardBatch:
    mode: ForwardMode
    batch_size: int
    # [T] token ids; decode tokens not yet known on the host are negative placeholders
    # (-1 - k means "the token sampled for row k of the previous step"), resolved by the
    # model runner on the device before the model sees them (overlap scheduling).
    input_ids: torch.Tensor
    positions: torch.Tensor  # [T] int64
    out_cache_loc: Optional[torch.Tensor]  # [T] int64 KV slots the new tokens are written to
    req_pool_indices: torch.Tensor  # [B] int64 rows of req_to_token
    seq_lens: torch.Tensor  # [B] int64
    prefix_lens: torch.Tensor  # [B] int64
    extend_lens: torch.Tensor  # [B] int64
    extend_start_loc: torch.Tensor  # [B] int64
    # Host copies, for backends that loop on the CPU (torch) and for planning (flashinfer).
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    # Rows of the [T, hidden] output for which logits are computed, in order.
    logits_indices: torch.Tensor
    # Rows of the logits to sample from: one per sampling request (a request whose last
    # new token completes its known tokens), in the SamplingBatch's order.
    sample_rows: torch.Tensor
    req_to_token: Optional[torch.Tensor] = None
    kv_pool: Optional["KVPool"] = None
    attn_backend: Optional["AttentionBackend"] = None
    # Free-form per-step state a backend builds in `prepare` (plans, index buffers).
    attn_state: Any = None
    # Sampling tensors for the requests that sample (see asgl/engine/sampler.py).
    sampling: Any = None
    # Prompt logprobs: logits rows whose next-token logprob is asked for, the target token
    # of each row, and the most top alternatives any request wants (0: none).
    prompt_lp_rows: Optional[torch.Tensor] = None
    prompt_lp_targets: Optional[torch.Tensor] = None
    prompt_lp_topk: int = 0
    extra: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> "ForwardBatch":
        """Move every tensor field to `device` (non-blocking); worker thread only."""
        for name in INDEX_FIELDS + PROMPT_LP_FIELDS:
            value = getattr(self, name)
            if value is not None and value.device != device:
                setattr(self, name, value.to(device, non_blocking=True))
        return self

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, *, mode: ForwardMode, input_ids: IntSeq, positions: IntSeq,
              out_cache_loc: torch.Tensor | None, req_pool_indices: IntSeq,
              prefix_lens: IntSeq, extend_lens: IntSeq, logits_rows: IntSeq,
              sample_rows: IntSeq, device: torch.device, req_to_token=None, kv_pool=None,
              attn_backend=None, sampling=None) -> "ForwardBatch":
        """Assemble from host lists or int64 numpy arrays (taken without a copy: the caller
        hands them over): one host tensor per field, copied non-blocking."""
        pin = device.type == "cuda"

        def dev(values):
            # through numpy: ~4x faster than torch.tensor on a list of ints
            t = torch.from_numpy(np.asarray(values, dtype=np.int64))
            if pin:
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        prefix = np.asarray(prefix_lens, dtype=np.int64)
        extend = np.asarray(extend_lens, dtype=np.int64)
        seq = prefix + extend
        starts = np.cumsum(extend) - extend
        seq_lens, prefix_lens, extend_lens = seq.tolist(), prefix.tolist(), extend.tolist()
        batch = cls(
            mode=mode,
            batch_size=len(extend_lens),
            input_ids=dev(input_ids),
            positions=dev(positions),
            out_cache_loc=None if out_cache_loc is None else out_cache_loc.to(device, non_blocking=True),
            req_pool_indices=dev(req_pool_indices),
            seq_lens=dev(seq),
            prefix_lens=dev(prefix),
            extend_lens=dev(extend),
            extend_start_loc=dev(starts),
            seq_lens_cpu=seq_lens,
            prefix_lens_cpu=prefix_lens,
            extend_lens_cpu=extend_lens,
            logits_indices=dev(logits_rows),
            sample_rows=dev(sample_rows),
            req_to_token=req_to_token,
            kv_pool=kv_pool,
            attn_backend=attn_backend,
            sampling=sampling,
        )
        if attn_backend is not None:
            attn_backend.prepare(batch)
        return batch
