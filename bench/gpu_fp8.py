"""FP8 GEMM checks and speed on a GPU (sm89+), at the Llama-3.1-8B linear shapes.

For each (M tokens, N, K), on fresh random inputs:
- the one-launch Triton activation quantizer equals the torch one bit for bit;
- row-wise W8A8 (`apply_fp8_rowwise`: per-token activation quantization + torch._scaled_mm)
  against its torch reference: the same FP8 operands dequantized to float32 and multiplied;
- block-wise W8A8 (`apply_fp8_block`: 1 x 128 activation groups + the Triton kernel) against
  `w8a8_block_matmul_reference`;
- the weight-only fallback (dequantize + bf16 matmul) against the same reference;
- times (CUDA events, median of 50) of each against the bf16 `F.linear` of the same shape.

    python3 bench/gpu_fp8.py [--out results.jsonl]

Exit status 1 when any check exceeds its tolerance (relative Frobenius error 1e-2; the
operands are identical, so only accumulation order and the bf16 output rounding differ).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asgl.layers.quantization.fp8_kernels import (  # noqa: E402
    FP8, apply_fp8_block, apply_fp8_rowwise, dequantize_rowwise, quantize_groupwise,
    quantize_rowwise, quantize_rowwise_fused, quantize_weight_per_channel,
    w8a8_block_matmul_reference)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
TOKENS = (1, 16, 128, 1024, 4096)
TOL = 1e-2


def _time(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def check(M: int, N: int, K: int, gen: torch.Generator) -> dict:
    dev = "cuda"
    x = torch.randn(M, K, device=dev, generator=gen).bfloat16()
    w = (torch.randn(N, K, device=dev, generator=gen) * 0.02).bfloat16()
    wq, ws = quantize_weight_per_channel(w)
    rec = {"M": M, "N": N, "K": K}
    # row-wise W8A8 vs the float32 product of the same quantized operands
    xq, xs = quantize_rowwise(x)
    fq, fs = quantize_rowwise_fused(x)  # the one-launch Triton form used by the layers
    rec["fused_quant_equal"] = bool(torch.equal(fq.view(torch.uint8), xq.view(torch.uint8))
                                    and torch.allclose(fs, xs, rtol=1e-6, atol=0))
    ref = (xq.float() * xs) @ dequantize_rowwise(wq, ws).T
    rec["rowwise_rel_err"] = _rel(apply_fp8_rowwise(x, wq, ws), ref)
    # weight-only fallback vs the bf16 input times the dequantized weight
    ref_wo = x.float() @ dequantize_rowwise(wq, ws).T
    rec["weight_only_rel_err"] = _rel(F.linear(x, dequantize_rowwise(wq, ws, x.dtype)), ref_wo)
    # block-wise W8A8
    bs = (torch.rand(-(-N // 128), K // 128, device=dev, generator=gen) + 0.5) * 1e-3
    wb = (torch.randn(N, K, device=dev, generator=gen) * 100).clamp(-448, 448).to(FP8)
    xg, xgs = quantize_groupwise(x, 128)
    ref_b = w8a8_block_matmul_reference(xg, wb, xgs, bs, (128, 128), torch.float32)
    rec["block_rel_err"] = _rel(apply_fp8_block(x, wb, bs, (128, 128)), ref_b)
    # speed
    t_bf16 = _time(lambda: F.linear(x, w))
    t_row = _time(lambda: apply_fp8_rowwise(x, wq, ws))
    t_block = _time(lambda: apply_fp8_block(x, wb, bs, (128, 128)))
    flop = 2 * M * N * K
    rec.update({"bf16_ms": t_bf16, "fp8_rowwise_ms": t_row, "fp8_block_ms": t_block,
                "bf16_tflops": flop / t_bf16 / 1e9, "fp8_rowwise_tflops": flop / t_row / 1e9,
                "rowwise_speedup": t_bf16 / t_row, "block_speedup": t_bf16 / t_block})
    rec["ok"] = rec["fused_quant_equal"] and all(
        rec[k] < TOL for k in ("rowwise_rel_err", "weight_only_rel_err", "block_rel_err"))
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        print("gpu_fp8: needs a CUDA GPU with FP8 tensor cores (sm89+)")
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    failed = 0
    for name, (N, K) in SHAPES.items():
        for M in TOKENS:
            rec = {"bench": "gpu_fp8", "shape": name, **check(M, N, K, gen),
                   "device": torch.cuda.get_device_name()}
            failed += not rec["ok"]
            print(f"[gpu_fp8] {name:8s} M={M:5d} err row {rec['rowwise_rel_err']:.1e} block "
                  f"{rec['block_rel_err']:.1e} wo {rec['weight_only_rel_err']:.1e} | bf16 "
                  f"{rec['bf16_ms']:.3f} ms, fp8 row {rec['fp8_rowwise_ms']:.3f} ms "
                  f"(x{rec['rowwise_speedup']:.2f}), block {rec['fp8_block_ms']:.3f} ms "
                  f"(x{rec['block_speedup']:.2f}) {'ok' if rec['ok'] else 'FAIL'}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
