"""The Triton kernel of the block-scaled FP8 GEMM (`fp8_kernels.w8a8_block_matmul`).

Each program computes a BLOCK_M x BLOCK_N tile of C = A @ B.T, walking K in steps of
BLOCK_K (which divides the scale block bk): every partial product of FP8 tiles, accumulated
in float32 by the tensor cores, is scaled by its rows' activation scales and its columns'
weight-block scales before it is added.
"""

import triton
import triton.language as tl


@triton.jit
def block_fp8_kernel(A, B, C, As, Bs, M, N, K, bn, bk,
                     stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + offs_n[None, :] * stride_bn + offs_k[:, None]  # B.T tile [BLOCK_K, BLOCK_N]
    as_ptrs = As + offs_m * stride_asm
    bs_ptrs = Bs + (offs_n // bn) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :] & (offs_k[:, None] < k_left), other=0.0)
        k_blk = (kb * BLOCK_K) // bk
        a_s = tl.load(as_ptrs + k_blk, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptrs + k_blk, mask=n_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = C + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def per_token_quant_kernel(X, Q, S, K, stride_x, ub, HAS_UB: tl.constexpr,
                           BLOCK: tl.constexpr):
    """One program per row: the row's absolute maximum (capped at `ub` when HAS_UB), the
    scale max / 448, and the row in FP8, in one pass (the torch form takes ~7 launches)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    if HAS_UB:
        amax = tl.minimum(amax, ub)
    scale = tl.maximum(amax / 448.0, 1e-12)
    q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    tl.store(Q + row * K + offs, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row, scale)
