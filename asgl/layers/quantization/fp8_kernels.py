"""FP8 (e4m3) GEMMs and the quantize / dequantize helpers around them.

Two weight layouts reach here, whatever the checkpoint format was:
- row-wise: an FP8 weight [N, K] and a float32 scale per output row [N] (a per-tensor
  scale is expanded to its rows, so fused q/k/v pieces with their own scales are one GEMM);
- block-wise: an FP8 weight [N, K] and a float32 scale per (bn x bk) block,
  `scale_inv` [ceil(N / bn), ceil(K / bk)] (DeepSeek V3: 128 x 128).

Activations are quantized per token (row-wise) or per token and group of bk columns
(block-wise), dynamically, or with one static scale when the checkpoint carries it.

Paths, picked per call from the device:
- GPU with FP8 tensor cores (sm89+): row-wise through `torch._scaled_mm` (scale_a [M, 1],
  scale_b [1, N], bf16/fp16 out); block-wise through `w8a8_block_matmul` (Triton);
- older GPUs, or shapes `_scaled_mm` refuses: weight-only, the weight dequantized to the
  activation dtype and a plain matmul;
- the CPU: the same dequantized path (exactly `x @ (w.float() * scale).T`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row quantizes with this scale instead of dividing by 0


# ---------------------------------------------------------------------------- quantize
def quantize_rowwise(x: torch.Tensor,
                     ub: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 [M, K], float32 scales [M, 1]) with x ~= q * scale per row; `ub`
    caps the row maximum (fbgemm's activation_scale_ub: outliers saturate instead)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    if ub is not None:
        amax = amax.clamp(max=ub)
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_rowwise_fused(x: torch.Tensor,
                           ub: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rowwise` in one Triton launch (the GPU path: a decode step quantizes the
    activations of every linear layer, where seven small launches each would cost more than
    the FP8 GEMM saves)."""
    import triton

    from asgl.layers.quantization._block_fp8_triton import per_token_quant_kernel

    M, K = x.shape
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M:
        block = triton.next_power_of_2(K)
        per_token_quant_kernel[(M,)](x, q, s, K, x.stride(0), float(ub or 0.0),
                                     HAS_UB=ub is not None, BLOCK=block,
                                     num_warps=min(16, max(4, block // 1024)))
    return q, s


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x quantized with one given scale (a checkpoint's static `input_scale`)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_groupwise(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 [M, K], float32 scales [M, K // group]): one scale per token and
    group of `group` columns (the activations of a block-wise GEMM)."""
    M, K = x.shape
    xg = x.float().view(M, K // group, group)
    scale = (xg.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(M, K)
    return q, scale


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16/32-bit weight [N, K] -> (FP8 [N, K], float32 [N]): `--quantization fp8`."""
    q, scale = quantize_rowwise(w)
    return q, scale.view(-1)


def dequantize_block(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A block-scaled FP8 weight [N, K] as `dtype` (the last blocks may be partial)."""
    bn, bk = block
    N, K = w.shape
    s = scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return (w.float() * s).to(dtype)


def dequantize_rowwise(w: torch.Tensor, scale: torch.Tensor,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (w.float() * scale.float().view(-1, 1)).to(dtype)


# ---------------------------------------------------------------------------- dispatch
@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """sm89 (Ada) and sm90+ (Hopper, Blackwell) multiply FP8 natively."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 9)


def _scaled_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    # cuBLASLt FP8 wants K and N in multiples of 16, 16-bit outputs for row-wise scales.
    return (has_fp8_tensor_cores(x.device) and x.dtype in (torch.bfloat16, torch.float16)
            and w.shape[1] % 16 == 0 and w.shape[0] % 16 == 0)


def apply_fp8_rowwise(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      input_scale: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None,
                      activation_ub: Optional[float] = None) -> torch.Tensor:
    """`x @ W.T + bias` for an FP8 weight [N, K] with row scales [N] (float32).

    On an FP8 GPU the activations are quantized too (per token, or with the static
    `input_scale`); elsewhere the weight is dequantized (weight-only)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if _scaled_mm_ok(x2, weight):
        if input_scale is None:
            xq, xs = quantize_rowwise_fused(x2.contiguous(), activation_ub)
        else:
            xq = quantize_static(x2, input_scale)
            xs = input_scale.float().reshape(1, 1).expand(x2.shape[0], 1).contiguous()
        out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.view(1, -1),
                               out_dtype=x.dtype)
        if bias is not None:
            out = out + bias
    else:
        out = F.linear(x2, dequantize_rowwise(weight, weight_scale, x.dtype), bias)
    return out.view(*shape[:-1], weight.shape[0])


def apply_fp8_block(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                    block: tuple[int, int], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x @ W.T + bias` for a block-scaled FP8 weight (W8A8 with 1 x bk activation groups
    on an FP8 GPU, weight-only elsewhere)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    bn, bk = block
    if has_fp8_tensor_cores(x.device) and x2.shape[1] % bk == 0:
        xq, xs = quantize_groupwise(x2, bk)
        out = w8a8_block_matmul(xq, weight, xs, scale_inv, block, x.dtype)
        if bias is not None:
            out = out + bias
    else:
        out = F.linear(x2, dequantize_block(weight, scale_inv, block, x.dtype), bias)
    return out.view(*shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------- Triton
def w8a8_block_matmul(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor,
                      b_scale: torch.Tensor, block: tuple[int, int],
                      out_dtype: torch.dtype) -> torch.Tensor:
    """C [M, N] = dequant(a) @ dequant(b).T with a FP8 [M, K] scaled per (row, bk group)
    `a_scale` [M, K / bk] and b FP8 [N, K] scaled per block `b_scale` [ceil(N/bn), K / bk]."""
    import triton

    from asgl.layers.quantization._block_fp8_triton import block_fp8_kernel

    M, K = a.shape
    N = b.shape[0]
    bn, bk = block
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = 128 if bn % 128 == 0 else 64
    block_k = min(bk, 128)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    block_fp8_kernel[grid](a, b, c, a_scale, b_scale, M, N, K, bn, bk,
                           a.stride(0), b.stride(0), c.stride(0), a_scale.stride(0),
                           b_scale.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                           BLOCK_K=block_k, num_warps=4, num_stages=3)
    return c


def w8a8_block_matmul_reference(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor,
                                b_scale: torch.Tensor, block: tuple[int, int],
                                out_dtype: torch.dtype) -> torch.Tensor:
    """The torch reference of `w8a8_block_matmul` (float32 dequantize, matmul)."""
    bn, bk = block
    a_deq = a.float() * a_scale.float().repeat_interleave(bk, 1)[:, :a.shape[1]]
    return (a_deq @ dequantize_block(b, b_scale, block).T).to(out_dtype)
