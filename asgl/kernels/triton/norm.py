"""RMSNorm fused with the residual add that precedes it, in one pass over the row.

`rmsnorm(x, weight, eps, residual)` computes `residual = x + residual` and returns
`(norm(residual), residual)`, reading x and residual once and writing both results once
(the unfused pair reads the sum back). Numerics follow asgl.layers.norm.RMSNorm (HF): the
sum is rounded to the activation dtype before its statistics are taken in float32; the
normalized row is rounded to the activation dtype before the weight multiplies it (Gemma:
scaled by 1 + w in float32, then rounded).

One program per row with the whole row in one tile (hidden sizes up to 32768).
`rmsnorm_ref` is the torch reference.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from asgl.kernels.triton._common import next_pow2


@triton.jit
def _rmsnorm_kernel(X, R, W, Y, R_OUT, N, eps,
                    stride_x, stride_r, stride_y, stride_ro,
                    HAS_RES: tl.constexpr, GEMMA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        x_round = x.to(R_OUT.dtype.element_ty)
        tl.store(R_OUT + row * stride_ro + cols, x_round, mask=ok)
        x = x_round.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if GEMMA:
        y = x * inv * (1.0 + w)
    else:
        y = (x * inv).to(Y.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=ok)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: Optional[torch.Tensor] = None, *, gemma: bool = False,
            inplace: bool = False) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """RMSNorm of x [.., N] (rows with a unit last stride); with `residual`, of
    x + residual, returning (normed, x + residual). `inplace=True` writes the normed rows
    into x and the sum into residual (no allocation; the vLLM/SGLang layer pattern)."""
    N = x.shape[-1]
    assert N <= 32768, "one tile per row: hidden size up to 32768"
    x2 = x.reshape(-1, N)
    assert x2.stride(-1) == 1
    M = x2.shape[0]
    y = x2 if inplace else torch.empty_like(x2)
    has_res = residual is not None
    if has_res:
        r2 = residual.reshape(-1, N)
        assert r2.stride(-1) == 1
        r_out = r2 if inplace else torch.empty_like(r2)
    else:
        r2 = r_out = x2  # unused pointers
    block = next_pow2(N)
    if M:
        _rmsnorm_kernel[(M,)](
            x2, r2, weight, y, r_out, N, eps, x2.stride(0), r2.stride(0), y.stride(0),
            r_out.stride(0), HAS_RES=has_res, GEMMA=gemma, BLOCK=block,
            num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    y = y.view(x.shape)
    if not has_res:
        return y
    return y, r_out.view(residual.shape)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: Optional[torch.Tensor] = None, *, gemma: bool = False
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The layer's math (asgl.layers.norm.RMSNorm) as a function."""
    def norm(v: torch.Tensor) -> torch.Tensor:
        vf = v.float()
        vf = vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + eps)
        if gemma:
            return (vf * (1.0 + weight.float())).to(v.dtype)
        return (weight * vf.to(v.dtype)).to(v.dtype)

    if residual is None:
        return norm(x)
    s = x + residual
    return norm(s), s
