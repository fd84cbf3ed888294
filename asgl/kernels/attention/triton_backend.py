"""Attention backend on our own Triton kernels (asgl/kernels/triton); any CUDA GPU, and the
CPU under TRITON_INTERPRET=1 (tests).

Per step, `prepare` records what the kernels need beyond the batch's own tensors; the
index buffers themselves are built lazily by the first layer and reused by the others:

- decode batches: the number of KV splits (from the longest sequence on the host, unless
  fixed at construction, as CUDA graphs need) and the float32 scratch of the two stages;
- other batches: the query-block schedule of the extend kernel (which request and which
  first token each program takes), built on the host from host lengths and copied
  non-blocking, so no step waits on the device.

Per layer, `forward` writes the new K/V into the pool, then runs decode attention for
DECODE batches and extend attention for the rest (a decode request in a MIXED batch is an
extend of one token). Both kernels read K/V through req_to_token: no gather copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from asgl.engine.contracts.attention import AttentionBackend, AttentionSpec
from asgl.kernels.triton.decode_attention import decode_attention, decode_scratch, num_kv_splits
from asgl.kernels.triton.extend_attention import build_schedule, extend_attention, tokens_per_block

if TYPE_CHECKING:
    from asgl.engine.contracts.forward_batch import ForwardBatch


@dataclass
class _TritonState:
    decode: bool
    max_seq_len: int
    schedules: dict = field(default_factory=dict)  # tokens per block -> (block_req, block_start)
    splits: dict = field(default_factory=dict)  # kv heads -> number of KV splits
    scratch: dict = field(default_factory=dict)  # (H, Dv, splits) -> decode stage-1 buffers


class TritonAttnBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_kv_splits: Optional[int] = None, max_kv_splits: int = 64):
        """`num_kv_splits`: a fixed split count for decode (CUDA graphs need one launch
        shape for every replay); None picks one per step from the batch."""
        self.fixed_splits = num_kv_splits
        self.max_kv_splits = max_kv_splits
        self._num_sms: Optional[int] = None
        self._alibi: dict = {}  # (slopes, device) -> float32 tensor, made on first use

    def prepare(self, batch: "ForwardBatch") -> None:
        batch.attn_state = _TritonState(
            decode=batch.mode.is_decode and batch.kv_pool is not None,
            max_seq_len=max(batch.seq_lens_cpu, default=0))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                batch: "ForwardBatch") -> torch.Tensor:
        state = batch.attn_state
        if not isinstance(state, _TritonState):
            self.prepare(batch)
            state = batch.attn_state
        T = q.shape[0]
        H, Hkv, D, Dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_dim
        q = q.reshape(T, H, D)
        k = k.reshape(T, Hkv, D)
        v = v.reshape(T, Hkv, Dv)
        out = q.new_empty(T, H, Dv)
        pool = batch.kv_pool
        window = spec.sliding_window
        if pool is not None:
            pool.set_kv(spec.layer_id, batch.out_cache_loc, k, v, spec.k_scale, spec.v_scale)
            k_buf, v_buf = pool.get_kv(spec.layer_id)
        if state.decode:
            splits = self._splits(state, batch, Hkv)
            key = (H, Dv, splits)
            if key not in state.scratch:
                state.scratch[key] = decode_scratch(T, H, splits, Dv, q.device)
            decode_attention(q, k_buf, v_buf, out, batch.req_to_token, batch.req_pool_indices,
                             batch.seq_lens, sm_scale=spec.scaling, num_splits=splits,
                             sliding_window=window, logit_cap=spec.logit_cap,
                             k_scale=spec.k_scale, v_scale=spec.v_scale,
                             mid=state.scratch[key], alibi_slopes=self._slopes(spec, q.device))
        else:
            tok_m = tokens_per_block(D, Dv, H // Hkv, q.dtype)
            if tok_m not in state.schedules:
                state.schedules[tok_m] = build_schedule(batch.extend_lens_cpu, tok_m, q.device)
            if pool is None:  # encoder: each sequence attends over its own new tokens
                k_buf, v_buf = k, v
            extend_attention(q, k_buf, v_buf, out,
                             batch.req_to_token if pool is not None else None,
                             batch.req_pool_indices if pool is not None else None,
                             batch.prefix_lens, batch.extend_lens, batch.extend_start_loc,
                             state.schedules[tok_m], sm_scale=spec.scaling, causal=spec.causal,
                             sliding_window=window, logit_cap=spec.logit_cap,
                             k_scale=spec.k_scale, v_scale=spec.v_scale,
                             alibi_slopes=self._slopes(spec, q.device))
        return out.reshape(T, H * Dv)

    def _slopes(self, spec: AttentionSpec, device: torch.device) -> Optional[torch.Tensor]:
        if spec.alibi_slopes is None:
            return None
        key = (spec.alibi_slopes, device)
        if key not in self._alibi:
            self._alibi[key] = torch.tensor(spec.alibi_slopes, dtype=torch.float32,
                                            device=device)
        return self._alibi[key]

    def _splits(self, state: _TritonState, batch: "ForwardBatch", num_kv_heads: int) -> int:
        if self.fixed_splits is not None:
            return self.fixed_splits
        if num_kv_heads not in state.splits:
            state.splits[num_kv_heads] = num_kv_splits(
                batch.batch_size, num_kv_heads, state.max_seq_len, num_sms=self._sms(batch),
                max_splits=self.max_kv_splits)
        return state.splits[num_kv_heads]

    def _sms(self, batch: "ForwardBatch") -> int:
        if self._num_sms is None:
            dev = batch.input_ids.device
            self._num_sms = (torch.cuda.get_device_properties(dev).multi_processor_count
                             if dev.type == "cuda" else 4)
        return self._num_sms
