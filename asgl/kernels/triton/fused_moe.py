"""Routed experts as two grouped GEMMs over expert-sorted rows (the fused-MoE scheme of
SGLang / vLLM, written here from the equations of `asgl/kernels/moe_torch.py`).

1. `moe_align_block_size`: the T*k (token, slot) pairs are sorted by expert on the device
   and each expert's run is padded to a multiple of BLOCK_M, so that every row block of
   the GEMMs belongs to one expert: `sorted_ids` (pair index, T*k for padding),
   `block_expert` (the expert of each row block, -1 past the end or for another EP rank's
   experts) and `num_padded` (a device scalar). No host synchronization: the buffers have
   a static upper bound on their size, so a CUDA graph captures the whole layer.
2. gate-up GEMM with the activation fused: each program computes a [BLOCK_M, BLOCK_N]
   tile of both the gate and the up half (two accumulators over the same A rows) and
   writes act(gate) * up, [T*k, I].
3. down GEMM: [T*k, I] x w2[e]^T, each row scaled by its routing weight in float32
   before it is rounded, [T*k, H]; then the k rows of a token are summed (torch's sum:
   float32 accumulation, rounded once).

Tensor parallelism needs nothing here (the layer passes this rank's intermediate slice);
expert parallelism passes `expert_map` (global id -> local id or -1): pairs routed to
another rank's experts are skipped and add nothing.

Block sizes come from `moe_config.get_config` (a table per shape and device, tuned by
`bench/gpu_moe.py tune`). Under the Triton interpreter (CPU tests) dots run in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from asgl.kernels.triton._common import dot_precision, interpreting, tl_dot, tl_tanh
from asgl.kernels.triton.moe_config import get_config

_ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


# --------------------------------------------------------------------------- sort / align
def padded_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded row count: at most min(pairs, experts) experts are hit,
    each wasting fewer than BLOCK_M rows."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


# Up to this many (token, slot) pairs the sort/align runs as one Triton program (decode:
# one launch instead of ~15 small torch ops, a few us for 1,024 pairs over 128 experts);
# beyond, torch's device sort.
SMALL_ALIGN_PAIRS = 1024


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int,
                         expert_map: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids [P] int32, block_expert [P / block_m] int32,
    num_padded [1] int32). `num_experts`: the local experts (w13.shape[0]).

    Pairs keep their order within an expert (a stable sort), so the result is
    deterministic; both paths give the same tensors."""
    if topk_ids.numel() <= SMALL_ALIGN_PAIRS:
        return _align_small(topk_ids, block_m, num_experts, expert_map)
    return _align_torch(topk_ids, block_m, num_experts, expert_map)


def _align_torch(topk_ids, block_m, num_experts, expert_map):
    flat = topk_ids.reshape(-1).long()
    if expert_map is not None:
        flat = expert_map.long()[flat]
    n, E, dev = flat.numel(), num_experts, flat.device
    # other ranks' experts (and any id out of range): a bucket of their own, skipped
    flat = torch.where((flat < 0) | (flat >= E), E, flat)
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:E] + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    first = counts.cumsum(0) - counts  # where each expert's run starts in the sorted order
    sorted_flat, order = torch.sort(flat, stable=True)
    P = padded_size(n, E, block_m)
    dest = torch.cat([starts, starts.new_full((1,), P)])[sorted_flat] + (
        torch.arange(n, device=dev) - first[sorted_flat])
    dest = torch.where(sorted_flat < E, dest, P)  # the skipped bucket lands on a dump slot
    sorted_ids = torch.full((P + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_first_row = torch.arange(0, P, block_m, device=dev)
    block_expert = torch.searchsorted(ends, block_first_row, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return sorted_ids[:P], block_expert, ends[-1:].to(torch.int32)


@triton.jit
def _align_small_kernel(ids_ptr, map_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                        n, E, P, HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr,
                        E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """One program: counts per expert, padded offsets, then each pair's slot (its rank
    among the earlier pairs of its expert), chunk by chunk with one-hot [CHUNK, E] tiles."""
    experts = tl.arange(0, E_POW2)
    rows = tl.arange(0, CHUNK)
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for c0 in range(0, n, CHUNK):
        idx = c0 + rows
        e = tl.load(ids_ptr + idx, mask=idx < n, other=-1)
        if HAS_MAP:
            e = tl.load(map_ptr + e, mask=e >= 0, other=-1)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)
        counts += tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, total)
    fill = tl.arange(0, 1024)
    for p0 in range(0, P, 1024):  # padding everywhere first (wide stores: P >> pairs)
        tl.store(sorted_ptr + p0 + fill, tl.zeros([1024], tl.int32) + n, mask=p0 + fill < P)
    for b0 in range(0, P // BLOCK_M, CHUNK):  # each row block's expert; -1 past the end
        first_row = (b0 + rows) * BLOCK_M
        ends_valid = tl.where(experts < E, ends, 2147483647)
        owner = tl.sum((ends_valid[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        owner = tl.where((owner < E) & (first_row < total), owner, -1)
        tl.store(block_expert_ptr + b0 + rows, owner, mask=b0 + rows < P // BLOCK_M)
    tl.debug_barrier()  # the padding stores land before the pairs' stores
    seen = tl.zeros([E_POW2], dtype=tl.int32)
    for c0 in range(0, n, CHUNK):
        idx = c0 + rows
        e = tl.load(ids_ptr + idx, mask=idx < n, other=-1)
        if HAS_MAP:
            e = tl.load(map_ptr + e, mask=e >= 0, other=-1)
        onehot = (e[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of this chunk, same expert
        slot = tl.sum(onehot * (before + starts[None, :] + seen[None, :]), axis=1)
        tl.store(sorted_ptr + slot, idx.to(tl.int32), mask=(idx < n) & (e >= 0) & (e < E))
        seen += tl.sum(onehot, axis=0)


def _align_small(topk_ids, block_m, num_experts, expert_map):
    n, dev = topk_ids.numel(), topk_ids.device
    P = padded_size(n, num_experts, block_m)
    sorted_ids = torch.empty(P, dtype=torch.int32, device=dev)
    block_expert = torch.empty(P // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    ids = topk_ids.reshape(-1).to(torch.int32)
    e_pow2 = triton.next_power_of_2(num_experts)
    _align_small_kernel[(1,)](
        ids, expert_map if expert_map is not None else ids, sorted_ids, block_expert,
        num_padded, n, num_experts, P, HAS_MAP=expert_map is not None, BLOCK_M=block_m,
        E_POW2=e_pow2, CHUNK=max(16, min(64, 8192 // e_pow2)),
        num_warps=8 if e_pow2 >= 128 else 4)
    return sorted_ids, block_expert, num_padded


# --------------------------------------------------------------------------- GEMM
@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * tl.sigmoid(x)
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    return 0.5 * x * (1.0 + tl_tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


@triton.jit
def _moe_gemm_kernel(
    A, B, C, W, sorted_ids, block_expert, num_padded,
    N, K, num_pairs, top_k,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    num_m_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, A_PER_TOKEN: tl.constexpr, GATED: tl.constexpr,
    ACT: tl.constexpr, MUL_WEIGHT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """C[pair, n] = sum_k A[row(pair), k] * B[e, n, k] (GATED: act(that) * the same with
    B rows n + N), times W[pair] if MUL_WEIGHT; row(pair) = pair // top_k if A_PER_TOKEN."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row blocks share their B tiles in L2
    in_group = GROUP_M * num_n_blocks
    group = pid // in_group
    first_m = group * GROUP_M
    group_m = min(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_m)
    pid_n = (pid % in_group) // group_m
    if pid_m * BLOCK_M >= tl.load(num_padded):
        return
    expert = tl.load(block_expert + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids + offs_m).to(tl.int64)
    valid = pair < num_pairs
    if A_PER_TOKEN:
        a_row = pair // top_k
    else:
        a_row = pair
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl_dot(a, b, acc, DOT_F32, PREC)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_up = tl_dot(a, b_up, acc_up, DOT_F32, PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if GATED:
        acc = _activation(acc, ACT) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(W + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = C + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def _gemm(a, b, c, weights, sorted_ids, block_expert, num_padded, *, n_out: int,
          num_pairs: int, top_k: int, per_token: bool, gated: bool, act: int, cfg: dict) -> None:
    K = a.shape[1]
    P = sorted_ids.numel()
    m_blocks = P // cfg["BLOCK_M"]
    grid = (m_blocks * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, b, c, weights if weights is not None else sorted_ids,  # unread unless MUL_WEIGHT
        sorted_ids, block_expert, num_padded,
        n_out, K, num_pairs, top_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1), m_blocks,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], A_PER_TOKEN=per_token, GATED=gated, ACT=act,
        MUL_WEIGHT=weights is not None, DOT_F32=interpreting(), PREC=dot_precision(a.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                  activation: str = "silu", expert_map: Optional[torch.Tensor] = None,
                  config: Optional[dict] = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k]
    (global ids) -> [T, H] in x's dtype. Same contract as `moe_torch.fused_experts_ref`."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    I, k = two_i // 2, topk_ids.shape[1]
    assert w2.shape == (E, H, I), (w2.shape, (E, H, I))
    cfg = config or get_config(T, E, I, H, k, x.dtype)
    n = T * k
    out_pairs = (torch.zeros if expert_map is not None else torch.empty)(
        n, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return x.new_zeros(0, H)
    sorted_ids, block_expert, num_padded = moe_align_block_size(
        topk_ids, cfg["BLOCK_M"], E, expert_map)
    inter = torch.empty(n, I, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).float().contiguous()
    _gemm(x, w13, inter, None, sorted_ids, block_expert, num_padded, n_out=I, num_pairs=n,
          top_k=k, per_token=True, gated=True, act=_ACT[activation], cfg=cfg)
    _gemm(inter, w2, out_pairs, weights, sorted_ids, block_expert, num_padded, n_out=H,
          num_pairs=n, top_k=k, per_token=False, gated=False, act=0,
          cfg={**cfg, **cfg.get("down", {}), "BLOCK_M": cfg["BLOCK_M"]})
    if k == 1:
        return out_pairs
    # one kernel: torch accumulates half-precision sums in float32 and rounds once
    return out_pairs.view(T, k, H).sum(dim=1)
