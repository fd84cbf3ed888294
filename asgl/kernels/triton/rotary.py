"""Rotary position embedding applied in place to q and k, from a cos/sin cache.

The cache is asgl.layers.rotary.RotaryEmbedding's `cos_sin_cache` [max_pos, rotary_dim]
(cos in the first half, sin in the second), so every scaling (linear, Llama-3, YaRN,
dynamic NTK) is already baked in and the kernel only indexes it by position. NeoX style
pairs dim i with i + rotary_dim/2; GPT-J style pairs 2i with 2i + 1. Dims past rotary_dim
(partial rotary) are left as they are.

One program per token rotates all its q heads and k heads ([heads, rotary_dim/2] tiles);
the rotation is computed in float32 and rounded once. `rotary_ref` is the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asgl.kernels.triton._common import next_pow2


@triton.jit
def _rotate_heads(X, t, cos, sin, i1, i2, r_ok, stride_t, stride_h, HEADS: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    ok = (h < HEADS)[:, None] & r_ok[None, :]
    base = X + t * stride_t + h[:, None] * stride_h
    x1 = tl.load(base + i1[None, :], mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(base + i1[None, :], (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=ok)
    tl.store(base + i2[None, :], (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(Q, K, COS_SIN, POS, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                   HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr,
                   NEOX: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < HALF
    cos = tl.load(COS_SIN + pos * stride_cs + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(COS_SIN + pos * stride_cs + HALF + r, mask=r_ok,
                  other=0.0).to(tl.float32)[None, :]
    if NEOX:
        i1 = r
        i2 = r + HALF
    else:
        i1 = 2 * r
        i2 = 2 * r + 1
    _rotate_heads(Q, t, cos, sin, i1, i2, r_ok, stride_qt, stride_qh, HQ, BLOCK_HQ)
    _rotate_heads(K, t, cos, sin, i1, i2, r_ok, stride_kt, stride_kh, HK, BLOCK_HK)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, head_dim: int,
                     is_neox_style: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq * head_dim] and k [T, Hk * head_dim] in place by `positions` [T];
    returns them. Each head's dims must be contiguous (the tokens may be strided, e.g.
    q and k as views into one fused qkv output)."""
    T = positions.shape[0]
    rot = cos_sin_cache.shape[-1]
    hq, hk = q.shape[-1] // head_dim, k.shape[-1] // head_dim
    q3, k3 = q.view(T, hq, head_dim), k.view(T, hk, head_dim)
    assert q3.stride(-1) == 1 and k3.stride(-1) == 1
    if T:
        _rotary_kernel[(T,)](
            q3, k3, cos_sin_cache, positions, q3.stride(0), q3.stride(1), k3.stride(0),
            k3.stride(1), cos_sin_cache.stride(0), HQ=hq, HK=hk, HALF=rot // 2,
            BLOCK_HQ=next_pow2(hq), BLOCK_HK=next_pow2(hk), BLOCK_R=next_pow2(rot // 2),
            NEOX=is_neox_style, num_warps=4)
    return q, k


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor, head_dim: int,
               is_neox_style: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place float32 reference (asgl.layers.rotary's math without its roundings)."""
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.float().index_select(0, positions).chunk(2, dim=-1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        x = x.float().reshape(x.shape[0], -1, head_dim)
        r, rest = x[..., :rot], x[..., rot:]
        c, s = cos[:, None], sin[:, None]
        if is_neox_style:
            x1, x2 = r.chunk(2, dim=-1)
            r = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        else:
            x1, x2 = r[..., 0::2], r[..., 1::2]
            r = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
        return torch.cat([r, rest], dim=-1).flatten(1)

    return apply(q), apply(k)
