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

MLA (asgl/layers/mla.py): decode batches of a latent layer (`spec.kv_latent`) run the MLA
decode kernel (mla_decode.py) over the latent pool; in extend / mixed batches the requests
with many new tokens come expanded through `forward_expanded`, which runs the extend kernel
with the gathered K/V standing in for the pool and `MLAKVIndex.table` for req_to_token,
and the others through `forward_latent_rows`: the MLA decode kernel with each query row as
its own request (its key count = its position + 1: causal by construction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from asgl.engine.contracts.attention import (AttentionBackend, AttentionSpec, MLAKVIndex,
                                             MLALatentRows)
from asgl.kernels.triton.decode_attention import decode_attention, decode_scratch, num_kv_splits
from asgl.kernels.triton.extend_attention import build_schedule, extend_attention, tokens_per_block
from asgl.kernels.triton.mla_decode import mla_decode_attention, mla_head_blocks

if TYPE_CHECKING:
    from asgl.engine.contracts.forward_batch import ForwardBatch


@dataclass
class _TritonState:
    decode: bool
    max_seq_len: int
    schedules: dict = field(default_factory=dict)  # tokens per block -> (block_req, block_start)
    splits: dict = field(default_factory=dict)  # kv heads -> number of KV splits
    scratch: dict = field(default_factory=dict)  # (H, Dv, splits) -> decode stage-1 buffers
    # CUDA-graph decode: the static (seq_lens, req_pool_indices) the kernels read instead
    # of the batch's own, rewritten before every replay
    graph: Optional[tuple[torch.Tensor, torch.Tensor]] = None


class TritonAttnBackend(AttentionBackend):
    name = "triton"
    mla_expanded_prefill = True
    # Decode-only CUDA graphs, switched on per model (`enable_decode_graphs`; today MLA
    # models): extends always run eagerly (graph_extend False: none are captured).
    supports_cuda_graph = False
    graph_extend = False

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
        seq_lens, rpi = state.graph or (batch.seq_lens, batch.req_pool_indices)
        if state.decode and spec.kv_latent:
            # the kernel's programs are (request, block of 16 heads, split)
            splits = self._splits(state, batch, mla_head_blocks(H))
            mla_decode_attention(q, k_buf, out, batch.req_to_token, rpi, seq_lens,
                                 kv_lora_rank=Dv, sm_scale=spec.scaling,
                                 num_splits=splits, k_scale=spec.k_scale,
                                 mid=self._scratch(state, T, H, splits, Dv, q.device))
        elif state.decode:
            splits = self._splits(state, batch, Hkv)
            decode_attention(q, k_buf, v_buf, out, batch.req_to_token, rpi, seq_lens,
                             sm_scale=spec.scaling, num_splits=splits,
                             sliding_window=window, logit_cap=spec.logit_cap,
                             k_scale=spec.k_scale, v_scale=spec.v_scale,
                             mid=self._scratch(state, T, H, splits, Dv, q.device),
                             alibi_slopes=self._slopes(spec, q.device))
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

    def forward_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         index: MLAKVIndex, spec: AttentionSpec,
                         batch: "ForwardBatch") -> torch.Tensor:
        T, H, D, Dv = q.shape[0], spec.num_heads, spec.head_dim, spec.v_dim
        out = q.new_empty(T, H, Dv)
        tok_m = tokens_per_block(D, Dv, 1, q.dtype)
        if tok_m not in index.cache:  # one schedule per step, shared by the layers
            index.cache[tok_m] = build_schedule(index.extend_lens_cpu, tok_m, q.device)
        extend_attention(q, k, v, out, index.table, index.rows, index.prefix_lens,
                         index.extend_lens, index.extend_start_loc, index.cache[tok_m],
                         sm_scale=spec.scaling, causal=True)
        return out.reshape(T, H * Dv)

    def forward_latent_rows(self, q: torch.Tensor, rows: MLALatentRows, spec: AttentionSpec,
                            batch: "ForwardBatch") -> torch.Tensor:
        T, H, Dv = q.shape[0], spec.num_heads, spec.v_dim
        out = q.new_empty(T, H, Dv)
        if H not in rows.splits:
            rows.splits[H] = num_kv_splits(T, mla_head_blocks(H), max(rows.seq_lens_cpu),
                                           num_sms=self._sms(batch),
                                           max_splits=self.max_kv_splits)
        k_buf, _ = batch.kv_pool.get_kv(spec.layer_id)
        mla_decode_attention(q, k_buf, out, batch.req_to_token, rows.req_pool_indices,
                             rows.seq_lens, kv_lora_rank=Dv, sm_scale=spec.scaling,
                             num_splits=rows.splits[H], k_scale=spec.k_scale)
        return out.reshape(T, H * Dv)

    def _scratch(self, state: _TritonState, T: int, H: int, splits: int, Dv: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode stage 1's float32 scratch, shared by the step's layers. Graphed steps
        slice one buffer sized for the largest graph (allocated in its warm-up, before any
        capture) so that the captured graphs do not each keep their own."""
        key = (H, Dv, splits)
        if state.graph is not None:
            if key not in self._g_scratch:
                self._g_scratch[key] = decode_scratch(self._g_max_bs, H, splits, Dv, device)
            mid_o, mid_l = self._g_scratch[key]
            return mid_o[:T], mid_l[:T]
        if key not in state.scratch:
            state.scratch[key] = decode_scratch(T, H, splits, Dv, device)
        return state.scratch[key]

    # ------------------------------------------------------------------ CUDA graphs
    def enable_decode_graphs(self, num_splits: int = 16) -> None:
        """Let the graph runner capture decode batches; graphed steps use `num_splits` KV
        splits whatever the lengths (one launch shape for every replay)."""
        self.supports_cuda_graph = True
        self.graph_splits = num_splits

    def init_cuda_graph_state(self, shapes: list[tuple[int, int]], max_kv_tokens: int,
                              device: Optional[torch.device] = None) -> None:
        if any(bs != tokens for bs, tokens in shapes):
            raise NotImplementedError("triton backend: decode graphs only (graph_extend False)")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        max_bs = max(bs for bs, _ in shapes)
        self._g_max_bs, self._g_scratch = max_bs, {}
        self._g_seq_lens = torch.ones(max_bs, dtype=torch.int64, device=device)
        self._g_rpi = torch.zeros(max_bs, dtype=torch.int64, device=device)

    def prepare_cuda_graph(self, batch: "ForwardBatch", padded_bs: int,
                           padded_tokens: Optional[int] = None) -> None:
        """Point the batch's state at the static lengths / table rows, filled with this
        batch's and, for the padding rows, one key each (position 0 of table row 0: the
        padding rows' outputs are discarded)."""
        if padded_tokens not in (None, padded_bs) or not batch.mode.is_decode:
            raise NotImplementedError("triton backend: decode graphs only")
        bs = batch.batch_size
        seq_lens, rpi = self._g_seq_lens[:padded_bs], self._g_rpi[:padded_bs]
        seq_lens[:bs].copy_(batch.seq_lens, non_blocking=True)
        seq_lens[bs:].fill_(1)
        rpi[:bs].copy_(batch.req_pool_indices, non_blocking=True)
        rpi[bs:].zero_()
        batch.attn_state = _TritonState(decode=True, max_seq_len=0, graph=(seq_lens, rpi))
    def _slopes(self, spec: AttentionSpec, device: torch.device) -> Optional[torch.Tensor]:
        if spec.alibi_slopes is None:
            return None
        key = (spec.alibi_slopes, device)
        if key not in self._alibi:
            self._alibi[key] = torch.tensor(spec.alibi_slopes, dtype=torch.float32,
                                            device=device)
        return self._alibi[key]

    def _splits(self, state: _TritonState, batch: "ForwardBatch", num_kv_heads: int) -> int:
        if state.graph is not None:
            return self.graph_splits
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
