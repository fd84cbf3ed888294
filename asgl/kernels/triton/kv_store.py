"""Writes a step's new K and V rows into the KV pool at their slots, in one kernel.

`store_kv(k, v, k_buf, v_buf, slots)`: k [T, Hkv, D] and v [T, Hkv, Dv] (token rows may be
strided, e.g. views into the fused qkv output; each token's heads contiguous) go to
`k_buf[slots[t]]` / `v_buf[slots[t]]` of the pool's [num_slots, Hkv, D] buffers, same dtype.
Replaces two `index_put` launches per layer. One program per token moves its K row and its
V row. `store_kv_ref` is the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from asgl.kernels.triton._common import next_pow2


@triton.jit
def _store_kv_kernel(K, V, KB, VB, SLOTS, stride_kt, stride_vt, stride_kbs, stride_vbs,
                     KW: tl.constexpr, VW: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    ck = tl.arange(0, BLOCK_K)
    k = tl.load(K + t * stride_kt + ck, mask=ck < KW)
    tl.store(KB + slot * stride_kbs + ck, k, mask=ck < KW)
    cv = tl.arange(0, BLOCK_V)
    v = tl.load(V + t * stride_vt + cv, mask=cv < VW)
    tl.store(VB + slot * stride_vbs + cv, v, mask=cv < VW)


def can_store(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> bool:
    """Whether `store_kv` applies: same dtypes, each token's [H, D] block contiguous, and
    pool rows contiguous (otherwise the caller's indexed assignment does the work)."""
    def rows_ok(x: torch.Tensor) -> bool:
        return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]

    return (k.dtype == k_buf.dtype and v.dtype == v_buf.dtype and rows_ok(k) and rows_ok(v)
            and rows_ok(k_buf) and rows_ok(v_buf) and k.shape[1:] == k_buf.shape[1:]
            and v.shape[1:] == v_buf.shape[1:])


def store_kv(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_buf[slots] = k and v_buf[slots] = v (see the module doc; check `can_store`)."""
    T = k.shape[0]
    kw, vw = k.shape[1] * k.shape[2], v.shape[1] * v.shape[2]
    if T:
        _store_kv_kernel[(T,)](k, v, k_buf, v_buf, slots, k.stride(0), v.stride(0),
                               k_buf.stride(0), v_buf.stride(0), KW=kw, VW=vw,
                               BLOCK_K=next_pow2(kw), BLOCK_V=next_pow2(vw),
                               num_warps=4 if max(kw, vw) <= 2048 else 8)


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                 slots: torch.Tensor) -> None:
    k_buf[slots] = k
    v_buf[slots] = v
