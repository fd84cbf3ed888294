"""Extend attention: each request's new tokens attend over its cached prefix and,
causally, over themselves, with K/V read from the token pool through `req_to_token`.

This covers prefill, chunked prefill, radix-cache hits and mixed batches (a decode request
is an extend of one token). The new tokens' K/V must already be in the pool (the backend
writes them first), so prefix and new keys are read the same way, in one loop.

Tiling: one program per (KV head, query block). A query block holds TOK_M consecutive new
tokens of one request times the GP (= G padded to a power of 2) query heads that share the
KV head, as BLOCK_M = TOK_M * GP rows (row r: token r // GP, head r % GP). Each K/V tile is
loaded once for the whole GQA group. The blocks of a step are listed in a schedule built
once per step (`build_schedule`), so no program is launched for nothing; within a request
the blocks with the most keys come first (and the heads of a block side by side), so the
last wave holds the cheapest programs.

Per program the key range is split in two loops: keys before the block's first query are
visible to every row (causal, no window), so that loop needs no mask; the rest (the
diagonal, windows, non-causal tails) is masked. Online softmax in base 2, in float32.

`extend_attention_ref` is the torch reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from asgl.kernels.triton._common import (dot_precision, interpreting, next_pow2, tl_dot,
                                         tl_logits2)


@triton.jit
def _extend_attn_kernel(
    Q, K, V, O,
    req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_start_loc,
    block_req, block_start, alibi,
    qk_scale, v_scale, logit_cap, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_r2t,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, FROM_POOL: tl.constexpr, DOT_F32: tl.constexpr,
    PREC: tl.constexpr, ALIBI: tl.constexpr,
):
    kvh = tl.program_id(0)
    pid = tl.program_id(1)
    TOK_M: tl.constexpr = BLOCK_M // GP

    req = tl.load(block_req + pid)
    first = tl.load(block_start + pid)  # first new token of this block, request-relative
    prefix = tl.load(prefix_lens + req)
    ext = tl.load(extend_lens + req)
    start = tl.load(extend_start_loc + req).to(tl.int64)
    seq = prefix + ext

    rows = tl.arange(0, BLOCK_M)
    tok = first + rows // GP
    head = kvh * G + rows % GP
    row_ok = (tok < ext) & (rows % GP < G)
    qpos = prefix + tok  # key index of each query row
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    n = tl.arange(0, BLOCK_N)

    q = tl.load(Q + (start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    if ALIBI:  # each row's head slope, in base-2 logits: + slope * (key - query position)
        slope = tl.load(alibi + head, mask=row_ok, other=0.0) * 1.4426950408889634
    if FROM_POOL:
        r2t = req_to_token + tl.load(req_pool_indices + req) * stride_r2t

    # Finite start for the running max: a row that has seen only masked keys keeps
    # exp2(-inf - m) = 0 and never computes inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    first_q = prefix + first
    last_q = prefix + tl.minimum(first + TOK_M, ext) - 1
    if CAUSAL:
        hi = last_q + 1
    else:
        hi = seq
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_q - window + 1, 0)
        if not CAUSAL:
            hi = tl.minimum(seq, last_q + window)
        full_end = 0
        masked_start = (lo // BLOCK_N) * BLOCK_N
    else:
        if CAUSAL:
            full_end = (first_q // BLOCK_N) * BLOCK_N
        else:
            full_end = (seq // BLOCK_N) * BLOCK_N
        masked_start = full_end

    # Loop 1: keys every row sees; no masks at all.
    for j0 in range(0, full_end, BLOCK_N):
        j = j0 + n
        if FROM_POOL:
            slot = tl.load(r2t + j)
        else:
            slot = start + j
        k = tl.load(K + slot[None, :] * stride_kt + kvh * stride_kh + d[:, None],
                    mask=d[:, None] < D, other=0.0).to(q.dtype)
        s = tl_dot(q, k, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_F32, PREC)
        s = tl_logits2(s, qk_scale, logit_cap, SOFTCAP)
        if ALIBI:
            s += slope[:, None] * (j[None, :] - qpos[:, None]).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + dv[None, :],
                    mask=dv[None, :] < DV, other=0.0).to(q.dtype)
        acc = tl_dot(p.to(q.dtype), v, acc * alpha[:, None], DOT_F32, PREC)
        m_i = m_new

    # Loop 2: the diagonal, window edges and non-causal keys, masked per element.
    for j0 in range(masked_start, hi, BLOCK_N):
        j = j0 + n
        in_range = (j < hi) & (j >= lo)
        if FROM_POOL:
            slot = tl.load(r2t + j, mask=in_range, other=0)
        else:
            slot = start + j
        k = tl.load(K + slot[None, :] * stride_kt + kvh * stride_kh + d[:, None],
                    mask=in_range[None, :] & (d[:, None] < D), other=0.0).to(q.dtype)
        s = tl_dot(q, k, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_F32, PREC)
        s = tl_logits2(s, qk_scale, logit_cap, SOFTCAP)
        if ALIBI:
            s += slope[:, None] * (j[None, :] - qpos[:, None]).to(tl.float32)
        ok = in_range[None, :]
        dist = qpos[:, None] - j[None, :]
        if CAUSAL:
            ok = ok & (dist >= 0)
        if USE_WINDOW:
            if CAUSAL:
                ok = ok & (dist < window)
            else:
                ok = ok & (dist < window) & (-dist < window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + dv[None, :],
                    mask=in_range[:, None] & (dv[None, :] < DV), other=0.0).to(q.dtype)
        acc = tl_dot(p.to(q.dtype), v, acc * alpha[:, None], DOT_F32, PREC)
        m_i = m_new

    # Rows with no visible key (padding rows only) have l = 0 and acc = 0: write 0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    tl.store(O + (start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


def extend_config(head_dim: int, v_head_dim: int, group: int,
                  dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages) for a head size and dtype."""
    bd = next_pow2(max(head_dim, v_head_dim), 16)
    if interpreting():
        bm, bn, warps, stages = 32, 16, 4, 1
    elif bd <= 128:
        # Best of a sweep on an H100 (bench/kernels.py --sweep, Llama-8B heads, bf16):
        # 266 TFLOP/s on 16 x 1024 fresh prefill vs 160 for (128, 64, 8, 2).
        bm, bn, warps, stages = 128, 32, 4, 3
    else:
        bm, bn, warps, stages = 64, 32, 8, 2
    if dtype == torch.float32 and not interpreting():
        bm, bn = max(bm // 2, 16), max(bn // 2, 16)
    return max(bm, next_pow2(group)), bn, warps, stages


def tokens_per_block(head_dim: int, v_head_dim: int, group: int, dtype: torch.dtype,
                     block_m: Optional[int] = None) -> int:
    """New tokens per query block (the schedule's unit) for the default or a given BLOCK_M."""
    bm = block_m or extend_config(head_dim, v_head_dim, group, dtype)[0]
    return bm // next_pow2(group)


def build_schedule(extend_lens: list[int], tok_m: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_req, block_start) int32: one entry per query block of TOK_M new tokens, a
    request's last block (most keys) first. Built on the host from host lengths and
    copied without a sync."""
    lens = torch.tensor(extend_lens, dtype=torch.int64)
    nblk = (lens + tok_m - 1) // tok_m
    block_req = torch.repeat_interleave(torch.arange(len(extend_lens)), nblk)
    lasts = torch.cumsum(nblk, 0) - 1  # last block of each request
    block_start = (lasts[block_req] - torch.arange(int(nblk.sum()))) * tok_m
    pin = device.type == "cuda"
    out = []
    for t in (block_req.to(torch.int32), block_start.to(torch.int32)):
        out.append((t.pin_memory() if pin else t).to(device, non_blocking=True))
    return out[0], out[1]


def extend_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                     out: torch.Tensor, req_to_token: Optional[torch.Tensor],
                     req_pool_indices: Optional[torch.Tensor], prefix_lens: torch.Tensor,
                     extend_lens: torch.Tensor, extend_start_loc: torch.Tensor,
                     schedule: tuple[torch.Tensor, torch.Tensor], *, sm_scale: float,
                     causal: bool = True, sliding_window: Optional[int] = None,
                     logit_cap: float = 0.0, k_scale: Optional[float] = None,
                     v_scale: Optional[float] = None,
                     config: Optional[tuple[int, int, int, int]] = None,
                     alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of the new tokens q [T, H, D] into out [T, H, Dv].

    K/V come from the pool buffers k_buf/v_buf [slots, Hkv, D|Dv] through
    req_to_token[req_pool_indices[i], :prefix+extend]; with `req_to_token=None` (encoders,
    no cache) they are the new tokens' own k/v [T, Hkv, D|Dv] and prefix_lens must be 0.
    `schedule` is `build_schedule(extend_lens, tokens_per_block(...))`. FP8 pools: the
    stored values are k / k_scale, v / v_scale; the scales are folded into the softmax
    scale and the output. `config` overrides `extend_config` (tuning; the schedule must
    then use its BLOCK_M). `alibi_slopes` [H] float32: ALiBi biases slope * (key - query
    position) on the scores.
    """
    T, H, D = q.shape
    Hkv, Dv = k_buf.shape[1], v_buf.shape[2]
    G = H // Hkv
    bm, bn, warps, stages = config or extend_config(D, Dv, G, q.dtype)
    block_req, block_start = schedule
    if block_req.numel() == 0:
        return out
    from_pool = req_to_token is not None
    r2t = req_to_token if from_pool else prefix_lens  # a dummy pointer when unused
    rpi = req_pool_indices if from_pool else prefix_lens
    grid = (Hkv, block_req.numel())
    _extend_attn_kernel[grid](
        q, k_buf, v_buf, out, r2t, rpi, prefix_lens, extend_lens, extend_start_loc,
        block_req, block_start, alibi_slopes if alibi_slopes is not None else q,
        sm_scale * (k_scale or 1.0), v_scale or 1.0, float(logit_cap), sliding_window or 0,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0),
        v_buf.stride(1), out.stride(0), out.stride(1), r2t.stride(0) if from_pool else 0,
        G=G, GP=next_pow2(G), D=D, DV=Dv, BLOCK_D=next_pow2(D, 16),
        BLOCK_DV=next_pow2(Dv, 16), BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
        USE_WINDOW=sliding_window is not None, SOFTCAP=logit_cap > 0, FROM_POOL=from_pool,
        DOT_F32=interpreting(), PREC=dot_precision(q.dtype), ALIBI=alibi_slopes is not None,
        num_warps=warps, num_stages=stages)
    return out


def extend_attention_ref(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                         req_to_token: Optional[torch.Tensor],
                         req_pool_indices: Optional[list[int]], prefix_lens: list[int],
                         extend_lens: list[int], *, sm_scale: float, causal: bool = True,
                         sliding_window: Optional[int] = None, logit_cap: float = 0.0,
                         k_scale: Optional[float] = None, v_scale: Optional[float] = None,
                         alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 torch reference with the same arguments (host lists for the lengths)."""
    T, H, D = q.shape
    Hkv, Dv = k_buf.shape[1], v_buf.shape[2]
    out = torch.zeros(T, H, Dv, dtype=torch.float32, device=q.device)
    start = 0
    for i, (pre, ext) in enumerate(zip(prefix_lens, extend_lens)):
        seq = pre + ext
        if req_to_token is not None:
            idx = req_to_token[req_pool_indices[i], :seq]
        else:
            idx = torch.arange(start, start + ext, device=q.device)
        k = k_buf[idx].float() * (k_scale or 1.0)
        v = v_buf[idx].float() * (v_scale or 1.0)
        k = k.repeat_interleave(H // Hkv, 1)
        v = v.repeat_interleave(H // Hkv, 1)
        qi = q[start:start + ext].float()
        s = torch.einsum("nhd,shd->hns", qi, k) * sm_scale
        if logit_cap > 0:
            s = logit_cap * torch.tanh(s / logit_cap)
        qpos = torch.arange(pre, seq, device=q.device)[:, None]
        kpos = torch.arange(seq, device=q.device)[None, :]
        dist = qpos - kpos
        if alibi_slopes is not None:
            s = s - alibi_slopes.float()[:, None, None] * dist
        ok = torch.ones_like(dist, dtype=torch.bool)
        if causal:
            ok &= dist >= 0
        if sliding_window is not None:
            ok &= (dist if causal else dist.abs()) < sliding_window
        s = s.masked_fill(~ok, -math.inf)
        out[start:start + ext] = torch.einsum("hns,shd->nhd", s.softmax(-1), v)
        start += ext
    return out
