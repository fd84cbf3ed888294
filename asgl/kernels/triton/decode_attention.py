"""Decode attention: one query token per request over its whole KV history in the token
pool, split-KV ("flash-decoding") so that a few long sequences still fill the GPU.

Stage 1, grid (B, KV heads, num_splits): each program takes one contiguous slice of a
request's keys and all G query heads that share its KV head. The G heads are the rows of
a [BLOCK_H, D] query tile (padded to at least 16 rows, the smallest tensor-core tile), so
each K/V tile is read from memory once per group rather than once per query head. It
writes its slice's normalized partial output and log-sum-exp (base 2) in float32.

Stage 2, grid (B, H): merges the num_splits partials by their log-sum-exps.

Slices are cut on the device from seq_lens, so for a fixed num_splits the launch is the
same every step (CUDA-graph safe). A slice past the end of a short sequence writes
lse = -inf and a zero partial, which the merge weighs 0.

`decode_attention_ref` is the torch reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from asgl.kernels.triton._common import (dot_precision, interpreting, next_pow2, tl_dot,
                                         tl_logits2)


@triton.jit
def _decode_stage1_kernel(
    Q, K, V, Mid_O, Mid_L,
    req_to_token, req_pool_indices, seq_lens, alibi,
    qk_scale, logit_cap, window, num_splits,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr,
    PREC: tl.constexpr, ALIBI: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sid = tl.program_id(2)

    seq = tl.load(seq_lens + b)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq - window, 0)
    # Slices rounded up to whole tiles so that only a slice's last tile is partial.
    split = tl.cdiv(tl.cdiv(seq - lo, num_splits), BLOCK_N) * BLOCK_N
    s0 = lo + sid * split
    s1 = tl.minimum(s0 + split, seq)

    h = tl.arange(0, BLOCK_H)
    head = kvh * G + h
    h_ok = h < G
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None] & (d[None, :] < D), other=0.0)
    r2t = req_to_token + tl.load(req_pool_indices + b) * stride_r2t
    if ALIBI:  # base-2 logits: + slope * (key position - query position seq - 1)
        slope = tl.load(alibi + head, mask=h_ok, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for j0 in range(s0, s1, BLOCK_N):
        j = j0 + n
        ok = j < s1
        slot = tl.load(r2t + j, mask=ok, other=0)
        k = tl.load(K + slot[None, :] * stride_kt + kvh * stride_kh + d[:, None],
                    mask=ok[None, :] & (d[:, None] < D), other=0.0).to(q.dtype)
        s = tl_dot(q, k, tl.zeros([BLOCK_H, BLOCK_N], tl.float32), DOT_F32, PREC)
        s = tl_logits2(s, qk_scale, logit_cap, SOFTCAP)
        if ALIBI:
            s += slope[:, None] * (j - (seq - 1))[None, :].to(tl.float32)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + dv[None, :],
                    mask=ok[:, None] & (dv[None, :] < DV), other=0.0).to(q.dtype)
        acc = tl_dot(p.to(q.dtype), v, acc * alpha[:, None], DOT_F32, PREC)
        m_i = m_new

    has = l_i > 0  # false for a slice past the end of the sequence
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(Mid_O + b * stride_ob + head[:, None] * stride_oh + sid * stride_os + dv[None, :],
             o, mask=h_ok[:, None] & (dv[None, :] < DV))
    tl.store(Mid_L + b * stride_lb + head * stride_lh + sid, lse, mask=h_ok)


@triton.jit
def _decode_stage2_kernel(
    Mid_O, Mid_L, O, v_scale, num_splits,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb, stride_fh,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    sp_ok = sp < num_splits
    lse = tl.load(Mid_L + b * stride_lb + h * stride_lh + sp, mask=sp_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # seq_len 0 (a padding row): all -inf
    w = tl.exp2(lse - top)
    o = tl.load(Mid_O + b * stride_ob + h * stride_oh + sp[:, None] * stride_os + dv[None, :],
                mask=sp_ok[:, None] & (dv[None, :] < DV), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0) * v_scale
    tl.store(O + b * stride_fb + h * stride_fh + dv, out.to(O.dtype.element_ty), mask=dv < DV)


def decode_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N keys, num_warps, num_stages) of stage 1."""
    if interpreting():
        return 16, 4, 1
    # Three stages keep enough K/V tiles in flight: 89-92% of the copy bandwidth on an
    # H100 at batch 64-256 (bench/kernels.py --sweep) against 76-79% with two.
    bn = 32 if head_dim > 128 or dtype == torch.float32 else 64
    return bn, 4, 3


def num_kv_splits(batch_size: int, num_kv_heads: int, max_seq_len: int, *,
                  num_sms: int = 132, waves: int = 2, min_keys: int = 128,
                  max_splits: int = 64) -> int:
    """Splits per sequence: enough programs for about `waves` waves over the SMs, but no
    split shorter than `min_keys` (then the merge would cost more than it saves)."""
    want = triton.cdiv(waves * num_sms, max(1, batch_size * num_kv_heads))
    cap = triton.cdiv(max(1, max_seq_len), min_keys)
    return max(1, min(want, cap, max_splits))


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                     out: torch.Tensor, req_to_token: torch.Tensor,
                     req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, *,
                     sm_scale: float, num_splits: int, sliding_window: Optional[int] = None,
                     logit_cap: float = 0.0, k_scale: Optional[float] = None,
                     v_scale: Optional[float] = None,
                     mid: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                     config: Optional[tuple[int, int, int]] = None,
                     alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, H, D] (one token per request) over pool k_buf/v_buf [slots, Hkv, D|Dv] through
    req_to_token[req_pool_indices[b], :seq_lens[b]] into out [B, H, Dv].

    `mid` optionally passes the float32 scratch buffers ([B, H, num_splits, Dv] partial
    outputs and [B, H, num_splits] log-sum-exps) so a step can reuse them across layers.
    `config` overrides `decode_config` (tuning). `alibi_slopes` [H] float32: ALiBi biases.
    """
    B, H, D = q.shape
    Hkv, Dv = k_buf.shape[1], v_buf.shape[2]
    G = H // Hkv
    if B == 0:
        return out
    if mid is None:
        mid = decode_scratch(B, H, num_splits, Dv, q.device)
    mid_o, mid_l = mid
    bn, warps, stages = config or decode_config(D, q.dtype)
    bdv = next_pow2(Dv, 16)
    _decode_stage1_kernel[(B, Hkv, num_splits)](
        q, k_buf, v_buf, mid_o, mid_l, req_to_token, req_pool_indices, seq_lens,
        alibi_slopes if alibi_slopes is not None else q,
        sm_scale * (k_scale or 1.0), float(logit_cap), sliding_window or 0, num_splits,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0),
        v_buf.stride(1), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
        G=G, BLOCK_H=next_pow2(G, 16), D=D, DV=Dv, BLOCK_D=next_pow2(D, 16), BLOCK_DV=bdv,
        BLOCK_N=bn, USE_WINDOW=sliding_window is not None,
        SOFTCAP=logit_cap > 0, DOT_F32=interpreting(), PREC=dot_precision(q.dtype),
        ALIBI=alibi_slopes is not None, num_warps=warps, num_stages=stages)
    _decode_stage2_kernel[(B, H)](
        mid_o, mid_l, out, v_scale or 1.0, num_splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
        out.stride(0), out.stride(1),
        DV=Dv, BLOCK_DV=bdv, BLOCK_S=next_pow2(num_splits, 2),
        num_warps=4 if bdv >= 128 else 2)
    return out


def decode_scratch(batch_size: int, num_heads: int, num_splits: int, v_head_dim: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's float32 outputs: partial outputs and log-sum-exps (never read unwritten:
    every (b, h, split) is written by stage 1)."""
    return (torch.empty(batch_size, num_heads, num_splits, v_head_dim, dtype=torch.float32,
                        device=device),
            torch.empty(batch_size, num_heads, num_splits, dtype=torch.float32, device=device))


def decode_attention_ref(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: list[int],
                         seq_lens: list[int], *, sm_scale: float,
                         sliding_window: Optional[int] = None, logit_cap: float = 0.0,
                         k_scale: Optional[float] = None, v_scale: Optional[float] = None,
                         alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 torch reference: each request's last position attends to its keys."""
    B, H, _ = q.shape
    Hkv = k_buf.shape[1]
    out = torch.empty(B, H, v_buf.shape[2], dtype=torch.float32, device=q.device)
    for b in range(B):
        seq = seq_lens[b]
        lo = max(0, seq - sliding_window) if sliding_window is not None else 0
        idx = req_to_token[req_pool_indices[b], lo:seq]
        k = (k_buf[idx].float() * (k_scale or 1.0)).repeat_interleave(H // Hkv, 1)
        v = (v_buf[idx].float() * (v_scale or 1.0)).repeat_interleave(H // Hkv, 1)
        s = torch.einsum("hd,shd->hs", q[b].float(), k) * sm_scale
        if logit_cap > 0:
            s = logit_cap * torch.tanh(s / logit_cap)
        if alibi_slopes is not None:
            keys = torch.arange(lo, seq, device=q.device, dtype=torch.float32)
            s = s + alibi_slopes.float()[:, None] * (keys - (seq - 1))[None, :]
        out[b] = torch.einsum("hs,shd->hd", s.softmax(-1), v)
    return out
