"""MLA decode attention in the weight-absorbed form: every query head of a request against
the request's cached latents, one [kv_lora_rank | rope] row per token (LatentKVPool).

Per head h and cached token j: score = q_lat[h] . c_j + q_pe[h] . k_pe_j (q_lat is q_nope
already multiplied by W_k, asgl/layers/mla.py), and the output is sum_j p_hj c_j in the
latent space (W_v is applied afterwards). All heads share the one latent row, so a
program takes BLOCK_H heads as the rows of a tensor-core tile and reads each latent tile
once for them, using it both as the key (transposed) and as the value: the cache is read
once per head block, not once for K and again for V.

Split-KV like decode_attention.py: stage 1, grid (B, head blocks, num_splits), writes each
slice's normalized partial output and base-2 log-sum-exp in float32; stage 2 (the same
merge kernel as decode_attention.py) combines them. Slices are cut on the device from
seq_lens: for a fixed num_splits the launch is the same every step (CUDA-graph safe).

`mla_decode_ref` is the float32 torch reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from asgl.kernels.triton._common import dot_precision, interpreting, next_pow2, tl_dot
from asgl.kernels.triton.decode_attention import _decode_stage2_kernel, decode_scratch


@triton.jit
def _mla_decode_stage1_kernel(
    Q, KV, Mid_O, Mid_L,
    req_to_token, req_pool_indices, seq_lens,
    qk_scale, num_splits,
    stride_qb, stride_qh, stride_kt, stride_r2t,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    H: tl.constexpr, DL: tl.constexpr, DR: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    sid = tl.program_id(2)

    seq = tl.load(seq_lens + b)
    split = tl.cdiv(tl.cdiv(seq, num_splits), BLOCK_N) * BLOCK_N
    s0 = sid * split
    s1 = tl.minimum(s0 + split, seq)

    head = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = head < H
    dl = tl.arange(0, BLOCK_DL)
    dr = tl.arange(0, BLOCK_DR)
    n = tl.arange(0, BLOCK_N)
    q_row = Q + b * stride_qb + head[:, None] * stride_qh
    q_lat = tl.load(q_row + dl[None, :], mask=h_ok[:, None] & (dl[None, :] < DL), other=0.0)
    q_pe = tl.load(q_row + DL + dr[None, :], mask=h_ok[:, None] & (dr[None, :] < DR), other=0.0)
    r2t = req_to_token + tl.load(req_pool_indices + b) * stride_r2t

    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DL], tl.float32)
    for j0 in range(s0, s1, BLOCK_N):
        j = j0 + n
        ok = j < s1
        slot = tl.load(r2t + j, mask=ok, other=0).to(tl.int64)
        row = KV + slot[:, None] * stride_kt
        c = tl.load(row + dl[None, :], mask=ok[:, None] & (dl[None, :] < DL),
                    other=0.0).to(q_lat.dtype)  # [BLOCK_N, DL]: key part and value
        pe = tl.load(row + DL + dr[None, :], mask=ok[:, None] & (dr[None, :] < DR),
                     other=0.0).to(q_lat.dtype)
        s = tl_dot(q_lat, tl.trans(c), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), DOT_F32, PREC)
        s = tl_dot(q_pe, tl.trans(pe), s, DOT_F32, PREC)
        s = s * (qk_scale * 1.4426950408889634)  # base-2 logits
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl_dot(p.to(q_lat.dtype), c, acc * alpha[:, None], DOT_F32, PREC)
        m_i = m_new

    has = l_i > 0  # false for a slice past the end of the sequence
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(Mid_O + b * stride_ob + head[:, None] * stride_oh + sid * stride_os + dl[None, :],
             o, mask=h_ok[:, None] & (dl[None, :] < DL))
    tl.store(Mid_L + b * stride_lb + head * stride_lh + sid, lse, mask=h_ok)


def mla_decode_config(kv_lora_rank: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_H heads, BLOCK_N keys, num_warps, num_stages) of stage 1."""
    if interpreting():
        return 16, 16, 4, 1
    if dtype == torch.float32 or kv_lora_rank > 512:
        return 16, 16, 4, 2
    return 16, 32, 4, 2


def mla_head_blocks(num_heads: int, block_h: int = 16) -> int:
    return triton.cdiv(num_heads, block_h)


def mla_decode_attention(q: torch.Tensor, kv_buf: torch.Tensor, out: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: torch.Tensor, *, kv_lora_rank: int, sm_scale: float,
                         num_splits: int, k_scale: Optional[float] = None,
                         mid: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                         config: Optional[tuple[int, int, int, int]] = None) -> torch.Tensor:
    """q [B, H, Dl + Dr] (absorbed queries, one token per request) over the latent pool
    kv_buf [slots, 1, Dl + Dr] through req_to_token[req_pool_indices[b], :seq_lens[b]] into
    out [B, H, Dl] (latent-space outputs). `mid`: stage 1's float32 scratch
    ([B, H, num_splits, Dl], [B, H, num_splits]), reusable across layers."""
    B, H, D = q.shape
    Dl, Dr = kv_lora_rank, D - kv_lora_rank
    if B == 0:
        return out
    if mid is None:
        mid = decode_scratch(B, H, num_splits, Dl, q.device)
    mid_o, mid_l = mid
    bh, bn, warps, stages = config or mla_decode_config(Dl, q.dtype)
    kv = kv_buf.view(kv_buf.shape[0], -1)
    _mla_decode_stage1_kernel[(B, triton.cdiv(H, bh), num_splits)](
        q, kv, mid_o, mid_l, req_to_token, req_pool_indices, seq_lens,
        sm_scale * (k_scale or 1.0), num_splits,
        q.stride(0), q.stride(1), kv.stride(0), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
        H=H, DL=Dl, DR=Dr, BLOCK_H=bh, BLOCK_DL=next_pow2(Dl, 16), BLOCK_DR=next_pow2(Dr, 16),
        BLOCK_N=bn, DOT_F32=interpreting(), PREC=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages)
    bdl = next_pow2(Dl, 16)
    _decode_stage2_kernel[(B, H)](
        mid_o, mid_l, out, k_scale or 1.0, num_splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
        out.stride(0), out.stride(1),
        DV=Dl, BLOCK_DV=bdl, BLOCK_S=next_pow2(num_splits, 2),
        num_warps=4 if bdl >= 128 else 2)
    return out


def mla_decode_ref(q: torch.Tensor, kv_buf: torch.Tensor, req_to_token: torch.Tensor,
                   req_pool_indices: list[int], seq_lens: list[int], *, kv_lora_rank: int,
                   sm_scale: float, k_scale: Optional[float] = None) -> torch.Tensor:
    """Float32 torch reference: [B, H, Dl]."""
    B, H, _ = q.shape
    out = torch.empty(B, H, kv_lora_rank, dtype=torch.float32, device=q.device)
    for b in range(B):
        lat = kv_buf[req_to_token[req_pool_indices[b], :seq_lens[b]], 0].float() * (k_scale or 1.0)
        s = q[b].float() @ lat.T * sm_scale  # [H, seq]
        out[b] = s.softmax(-1) @ lat[:, :kv_lora_rank]
    return out
