"""Reference attention backend in plain torch: correct for every case, not fast.

Per layer it writes the new tokens' K/V into the pool, then loops over the requests: each
gathers its whole K/V (prefix + new) through `req_to_token` and attends its new queries,
which sit at positions prefix_len .. seq_len-1, under a boolean mask (causal, sliding
window). Without a KV pool (encoders) a request attends over its own new tokens only.
Numerics follow HF's sdpa path: `scaled_dot_product_attention` in the input dtype; the
soft-capped and ALiBi paths (no SDPA equivalent) compute scores and softmax in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from asgl.engine.contracts.attention import (AttentionBackend, AttentionSpec, MLAKVIndex,
                                             MLALatentRows)

if TYPE_CHECKING:
    from asgl.engine.contracts.forward_batch import ForwardBatch


@dataclass
class _Req:
    start: int  # first row in the batch's [T] tokens
    extend_len: int
    prefix_len: int
    seq_len: int
    slots: Optional[torch.Tensor]  # [seq_len] KV slots; None without a pool


@dataclass
class _Plan:
    reqs: list[_Req]


class TorchNativeBackend(AttentionBackend):
    name = "torch"
    mla_expanded_prefill = True
    mla_expand_min_tokens = 4  # small: the CPU tests exercise both MLA forms

    def prepare(self, batch: "ForwardBatch") -> None:
        """Look up each request's slots once per step rather than once per layer."""
        reqs, start = [], 0
        for i, (ext, pre, seq) in enumerate(zip(batch.extend_lens_cpu, batch.prefix_lens_cpu,
                                                batch.seq_lens_cpu)):
            slots = None
            if batch.kv_pool is not None:
                slots = batch.req_to_token[batch.req_pool_indices[i], :seq]
            reqs.append(_Req(start, ext, pre, seq, slots))
            start += ext
        batch.attn_state = _Plan(reqs)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                batch: "ForwardBatch") -> torch.Tensor:
        if not isinstance(batch.attn_state, _Plan):
            self.prepare(batch)
        T = q.shape[0]
        q = q.reshape(T, spec.num_heads, spec.head_dim)
        k = k.reshape(T, spec.num_kv_heads, spec.head_dim)
        v = v.reshape(T, spec.num_kv_heads, spec.v_dim)
        pool = batch.kv_pool
        if pool is not None:
            pool.set_kv(spec.layer_id, batch.out_cache_loc, k, v, spec.k_scale, spec.v_scale)
            k_buf, v_buf = pool.get_kv(spec.layer_id)
        out = q.new_empty(T, spec.num_heads, spec.v_dim)
        for r in batch.attn_state.reqs:
            rows = slice(r.start, r.start + r.extend_len)
            if pool is not None:
                ki = _read(k_buf, r.slots, spec.k_scale, q.dtype)
                vi = _read(v_buf, r.slots, spec.v_scale, q.dtype)
                q_start = r.prefix_len
            else:
                ki, vi, q_start = k[rows], v[rows], 0
            out[rows] = _attend(q[rows], ki, vi, q_start, spec)
        return out.reshape(T, spec.num_heads * spec.v_dim)

    def forward_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         index: MLAKVIndex, spec: AttentionSpec,
                         batch: "ForwardBatch") -> torch.Tensor:
        out = q.new_empty(q.shape[0], spec.num_heads, spec.v_dim)
        q_start = 0
        for pre, ext, seq, s0 in zip(index.prefix_lens_cpu, index.extend_lens_cpu,
                                     index.seq_lens_cpu, index.kv_start):
            rows, keys = slice(q_start, q_start + ext), slice(s0, s0 + seq)
            out[rows] = _attend(q[rows], k[keys], v[keys], pre, spec)
            q_start += ext
        return out.reshape(q.shape[0], spec.num_heads * spec.v_dim)

    def forward_latent_rows(self, q: torch.Tensor, rows: MLALatentRows, spec: AttentionSpec,
                            batch: "ForwardBatch") -> torch.Tensor:
        buf, _ = batch.kv_pool.get_kv(spec.layer_id)
        Dv = spec.v_dim
        out = q.new_empty(q.shape[0], spec.num_heads, Dv)
        for r, seq in enumerate(rows.seq_lens_cpu):
            slots = batch.req_to_token[rows.req_pool_indices[r], :seq]
            lat = _read(buf, slots, spec.k_scale, q.dtype)  # [seq, 1, Dl + Dr]
            out[r:r + 1] = _attend(q[r:r + 1], lat, lat[..., :Dv], seq - 1, spec)
        return out.reshape(q.shape[0], spec.num_heads * Dv)


def _read(buf: torch.Tensor, slots: torch.Tensor, scale: Optional[float],
          dtype: torch.dtype) -> torch.Tensor:
    """Gather slots from the pool in the compute dtype, dequantizing an FP8 cache."""
    x = buf[slots].to(dtype)
    return x * scale if scale is not None else x


def _mask(n_q: int, n_k: int, q_start: int, spec: AttentionSpec,
          device: torch.device) -> Optional[torch.Tensor]:
    """[n_q, n_k] True where query (at key index q_start + i) may see key j; None: all."""
    window = spec.sliding_window
    if not spec.causal and window is None:
        return None
    if spec.causal and q_start + n_q == n_k and n_q == 1 and (window is None or window >= n_k):
        return None  # a decode token sees every key
    q_pos = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    k_pos = torch.arange(n_k, device=device)[None, :]
    allowed = k_pos <= q_pos if spec.causal else torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if window is not None:
        # At most `window` keys: the query itself and the window - 1 before it (both sides
        # for non-causal attention).
        dist = q_pos - k_pos if spec.causal else (q_pos - k_pos).abs()
        allowed = allowed & (dist < window)
    return allowed


def _alibi_bias(n_q: int, n_k: int, q_start: int, spec: AttentionSpec,
                device: torch.device) -> torch.Tensor:
    """[H, n_q, n_k] float32: slope_h * (key position - query position), <= 0 where causal."""
    slopes = torch.tensor(spec.alibi_slopes, dtype=torch.float32, device=device)
    q_pos = torch.arange(q_start, q_start + n_q, device=device, dtype=torch.float32)
    k_pos = torch.arange(n_k, device=device, dtype=torch.float32)
    return slopes[:, None, None] * (k_pos[None, :] - q_pos[:, None])[None]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int,
            spec: AttentionSpec) -> torch.Tensor:
    """q [n, H, D], k [s, Hkv, D], v [s, Hkv, Dv] -> [n, H, Dv]."""
    mask = _mask(q.shape[0], k.shape[0], q_start, spec, q.device)
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
    gqa = spec.num_heads != spec.num_kv_heads
    if spec.logit_cap > 0 or spec.alibi_slopes is not None:
        if gqa:
            group = spec.num_heads // spec.num_kv_heads
            kt, vt = kt.repeat_interleave(group, 0), vt.repeat_interleave(group, 0)
        scores = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) * spec.scaling
        if spec.logit_cap > 0:
            scores = spec.logit_cap * torch.tanh(scores / spec.logit_cap)
        if spec.alibi_slopes is not None:
            scores = scores + _alibi_bias(q.shape[0], k.shape[0], q_start, spec, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1), vt.float()).to(q.dtype)
    else:
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=spec.scaling,
                                           enable_gqa=gqa)
    return o.transpose(0, 1)
