"""The MoE layer on one GPU: correctness of the Triton grouped GEMM in bf16, its speed
against the measured ceilings, and block-size tuning.

    python bench/gpu_moe.py check [--out R]     # bf16 kernel vs float32 torch reference
    python bench/gpu_moe.py bench [--shape NAME ...] [--out R]
    python bench/gpu_moe.py tune --shape NAME [--budget-s 400]   # writes moe_configs/*.json

check: `fused_experts` (bf16) against `fused_experts_ref` (float32, same rounded inputs)
over tokens 1..8192, experts 8..256, top-k 1..8 and the served shapes; PASS when
||out - ref|| / ||ref|| < 1e-2 and no NaN.

bench: the `FusedMoE` layer (router top-k + sort/align + both GEMMs + the sum over
slots; not the gate's matmul) with random routing, per shape:
- decode batches 1..64: bytes of the expert weights the batch touches (distinct experts
  x 3 x H x I x 2 bytes) / time, against the device copy bandwidth measured in the same
  run (bar: >= 70%). Timed as CUDA-graph replays over weight copies that together exceed
  L2 (as decode runs: graphed, weights streamed from HBM).
- 8,192 prefill tokens: 2 x tokens x top_k x 3 x H x I FLOP / time, against the measured
  bf16 matmul rate (8192^3; bar: >= 50%). Eager.

tune: for each token count, times every block configuration of a pruned grid on the
shape (both GEMMs sharing it), then the down GEMM's own tiles with the best BLOCK_M, and
writes the fastest per token count to
asgl/kernels/triton/moe_configs/E=..,N=..,K=..,dtype=bf16,device=<GPU>.json (picked up
by `moe_config.get_config`), and a copy to --out-dir.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from asgl.kernels.moe_torch import fused_experts_ref  # noqa: E402
from asgl.kernels.triton import moe_config  # noqa: E402
from asgl.kernels.triton.fused_moe import fused_experts  # noqa: E402
from asgl.layers.moe import FusedMoE, RouterConfig, select_experts  # noqa: E402

DEV = torch.device("cuda")
DT = torch.bfloat16
# name: (experts, hidden, intermediate per expert, top_k)
SHAPES = {
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v2-lite": (64, 2048, 1408, 6),
    "deepseek-v3": (256, 7168, 2048, 8),
    "olmoe-1b-7b": (64, 2048, 1024, 8),
    "qwen1.5-moe-a2.7b": (60, 2048, 1408, 4),
}
DECODE_BATCHES = [1, 2, 4, 8, 16, 32, 64]
PREFILL_TOKENS = 8192


def _record(out: str | None, rec: dict) -> None:
    print(json.dumps(rec))
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _bench(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_ceilings() -> tuple[float, float]:
    """(GB/s of a 1 GiB device copy counting read + write, bf16 TFLOP/s of 8192^3)."""
    def copy_gbs() -> float:
        src = torch.randn(2**29, device=DEV, dtype=DT)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 2 / _bench(lambda: dst.copy_(src)) / 1e6

    gbs = copy_gbs()
    n = 8192
    x, y = (torch.randn(n, n, device=DEV, dtype=DT) for _ in range(2))
    return gbs, 2 * n**3 / _bench(lambda: x @ y) / 1e9


def _weights(E: int, H: int, I: int, gen: torch.Generator):
    w13 = torch.randn(E, 2 * I, H, device=DEV, dtype=DT, generator=gen) * H ** -0.5
    w2 = torch.randn(E, H, I, device=DEV, dtype=DT, generator=gen) * I ** -0.5
    return w13, w2


# ------------------------------------------------------------------------------ check
CHECK_CASES = [(1, 8, 1), (1, 256, 8), (7, 8, 2), (64, 128, 8), (300, 16, 4), (1024, 64, 6),
               (8192, 8, 2), (8192, 256, 8), (4096, 160, 6)]


def check(args) -> int:
    failed = 0
    gen = torch.Generator(device=DEV).manual_seed(0)
    cases = [(T, E, k, 1024, 512) for T, E, k in CHECK_CASES]
    cases += [(T, E, k, H, I) for (E, H, I, k) in SHAPES.values() for T in (1, 33, 2048)]
    for T, E, k, H, I in cases:
        w13, w2 = _weights(E, H, I, gen)
        x = torch.randn(T, H, device=DEV, dtype=DT, generator=gen)
        logits = torch.randn(T, E, device=DEV, generator=gen)
        weights, ids = select_experts(logits, RouterConfig(top_k=k))
        out = fused_experts(x, w13, w2, weights, ids)
        ref = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)
        err = float((out.double() - ref.double()).norm() / ref.double().norm())
        ok = err < 1e-2 and not torch.isnan(out).any()
        failed += not ok
        print(f"[check] {'PASS' if ok else 'FAIL'} moe T={T} E={E} k={k} H={H} I={I} "
              f"rel_err={err:.2e}")
        _record(args.out, {"bench": "moe_check", "T": T, "E": E, "k": k, "H": H, "I": I,
                           "rel_err": err, "pass": ok})
        del w13, w2
    print(f"[check] moe: {len(cases) - failed}/{len(cases)} passed")
    return 1 if failed else 0


# ------------------------------------------------------------------------------ bench
def _layer_calls(E, H, I, k, T, copies, gen):
    """One call per weight copy: the FusedMoE layer (router kernel, align, both GEMMs, the
    sum) on fresh random router logits."""
    calls, touched = [], []
    x = torch.randn(T, H, device=DEV, dtype=DT, generator=gen)
    for w13, w2 in copies:
        with torch.device("meta"):
            layer = FusedMoE(E, H, I, RouterConfig(top_k=k), params_dtype=DT)
        layer.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
        layer.w2_weight = torch.nn.Parameter(w2, requires_grad=False)
        logits = torch.randn(T, E, device=DEV, dtype=DT, generator=gen)
        _, ids = select_experts(logits, layer.router)
        touched.append(int(ids.unique().numel()))
        calls.append(lambda layer=layer, logits=logits: layer(x, logits))
    return calls, touched


def _time_graph(calls) -> float:
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return _bench(graph.replay) / len(calls)


def bench(args) -> int:
    gbs, tflops = measure_ceilings()
    name = torch.cuda.get_device_name()
    print(f"[bench] {name}: copy {gbs:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    _record(args.out, {"bench": "moe_ceilings", "device": name, "copy_gbs": gbs,
                       "matmul_tflops": tflops})
    gen = torch.Generator(device=DEV).manual_seed(0)
    below = 0
    for shape in args.shape:
        E, H, I, k = SHAPES[shape]
        expert_bytes = 3 * H * I * 2
        l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
        n_copies = max(2, min(4, -(-4 * l2 // (E * expert_bytes))))
        copies = [_weights(E, H, I, gen) for _ in range(n_copies)]
        for T in DECODE_BATCHES:
            calls, touched = _layer_calls(E, H, I, k, T, copies, gen)
            ms = _time_graph(calls)
            eager_ms = _bench(calls[0])
            achieved = sum(touched) / len(touched) * expert_bytes / ms / 1e6
            frac = achieved / gbs
            below += frac < 0.7
            print(f"[bench] {shape} decode T={T}: {ms * 1e3:.1f} us (eager {eager_ms * 1e3:.1f}),"
                  f" {sum(touched) / len(touched):.1f} experts, {achieved:.0f} GB/s = "
                  f"{100 * frac:.0f}% of copy ({'ok' if frac >= 0.7 else 'BELOW 70%'})")
            _record(args.out, {"bench": "moe_decode", "shape": shape, "T": T, "us": ms * 1e3,
                               "eager_us": eager_ms * 1e3, "gbs": achieved, "frac": frac,
                               "device": name})
        calls, _ = _layer_calls(E, H, I, k, PREFILL_TOKENS, copies[:1], gen)
        ms = _bench(calls[0])
        flops = 2 * PREFILL_TOKENS * k * 3 * H * I
        achieved = flops / ms / 1e9
        frac = achieved / tflops
        below += frac < 0.5
        print(f"[bench] {shape} prefill T={PREFILL_TOKENS}: {ms:.2f} ms, {achieved:.0f} "
              f"TFLOP/s = {100 * frac:.0f}% of matmul ({'ok' if frac >= 0.5 else 'BELOW 50%'})")
        _record(args.out, {"bench": "moe_prefill", "shape": shape, "T": PREFILL_TOKENS,
                           "ms": ms, "tflops": achieved, "frac": frac, "device": name})
        del copies
        torch.cuda.empty_cache()
    return 1 if below else 0


# ------------------------------------------------------------------------------ tune
TUNE_TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 8192]


def _bench_quick(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _candidates(T: int, E: int, k: int) -> list[dict]:
    rows = T * k / E
    block_ms = [16] if rows <= 16 else [16, 32, 64] if rows <= 128 else [64, 128]
    out = []
    for bm, bn, bk, warps, stages in itertools.product(block_ms, [64, 128, 256], [64, 128, 256],
                                                       [4, 8], [3, 4, 5]):
        if bm * bn * bk > 128 * 256 * 64 or (bm >= 64 and bk == 256):
            continue  # shared memory of one stage past what 4-5 stages fit
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1 if rows <= 16 else 16,
                        num_warps=warps, num_stages=stages))
    return out


def _down_candidates() -> list[dict]:
    return [dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=warps, num_stages=stages)
            for bn, bk, warps, stages in itertools.product([32, 64, 128, 256], [64, 128, 256],
                                                           [4, 8], [3, 4, 5])
            if bn * bk <= 256 * 128]


def tune(args) -> int:
    E, H, I, k = SHAPES[args.shape[0]]
    I //= args.tp
    gen = torch.Generator(device=DEV).manual_seed(0)
    w13, w2 = _weights(E, H, I, gen)
    best: dict[str, dict] = {}
    deadline = time.monotonic() + args.budget_s
    for T in args.tokens or TUNE_TOKENS:
        x = torch.randn(T, H, device=DEV, dtype=DT, generator=gen)
        w, ids = select_experts(torch.randn(T, E, device=DEV, generator=gen), RouterConfig(top_k=k))
        default = moe_config.default_config(T, E, I, H, k, DT)
        results = []
        for cfg in [default] + _candidates(T, E, k):
            if time.monotonic() > deadline:
                break
            try:
                ms = _bench_quick(lambda: fused_experts(x, w13, w2, w, ids, config=cfg))
            except Exception as exc:  # out of shared memory / registers for this config
                print(f"[tune] T={T} skip {cfg}: {type(exc).__name__}")
                continue
            results.append((ms, cfg))
        if not results:
            break
        ms, cfg = min(results, key=lambda r: r[0])
        base = results[0][0] if results[0][1] is default else float("nan")
        # then the down GEMM's own tiles, with the rows' BLOCK_M fixed
        for down in _down_candidates():
            if time.monotonic() > deadline:
                break
            trial = {**cfg, "down": down}
            try:
                t = _bench_quick(lambda: fused_experts(x, w13, w2, w, ids, config=trial))
            except Exception as exc:
                print(f"[tune] T={T} skip down {down}: {type(exc).__name__}")
                continue
            if t < ms:
                ms, cfg = t, trial
        best[str(T)] = cfg
        print(f"[tune] {args.shape[0]} T={T}: best {ms * 1e3:.1f} us (default {base * 1e3:.1f})"
              f" {cfg} ({len(results)} tried)")
    name = moe_config.config_file_name(E, I, H, DT, torch.cuda.get_device_name())
    for folder in [moe_config.CONFIG_DIR] + ([args.out_dir] if args.out_dir else []):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(best, f, indent=1)
        print(f"[tune] wrote {os.path.join(folder, name)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["check", "bench", "tune"])
    ap.add_argument("--shape", nargs="+", default=["mixtral-8x7b", "qwen3-30b-a3b",
                                                   "deepseek-v2-lite"],
                    choices=list(SHAPES))
    ap.add_argument("--tp", type=int, default=1, help="tune: intermediate split over N ranks")
    ap.add_argument("--tokens", type=int, nargs="*", help="tune: token counts")
    ap.add_argument("--budget-s", type=float, default=400.0, help="tune: stop after this")
    ap.add_argument("--out", help="append JSON records here")
    ap.add_argument("--out-dir", default=os.environ.get("OUT"), help="tune: copy the table here")
    args = ap.parse_args()
    return {"check": check, "bench": bench, "tune": tune}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
