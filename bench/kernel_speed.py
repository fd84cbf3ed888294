"""Micro-benchmark of asgl's Triton kernels (asgl/kernels/triton) on one GPU.

Each kernel is timed with `triton.testing.do_bench` (median; it flushes L2 before every
call) on Llama-3.1-8B shapes in bf16, next to the torch code it replaces. A timed call is
the replay of a CUDA graph of the kernel over several input sets in turn (together larger
than L2), divided by their number: launch overhead stays out (as in graph-replayed decode
steps) and no input is read from cache. Results are reported as
achieved bandwidth (memory-bound kernels: the fewest bytes each must move) or FLOP rate
(prefill attention), as a fraction of the measured H100 ceilings (~3.0 TB/s device copy,
~800 TFLOP/s bf16 matmul; `--measure-ceilings` re-measures them on the card at hand).

    python bench/kernel_speed.py --out bench/results.jsonl [--quick] [--measure-ceilings] [--sweep]

Prints a table last and appends one JSON line per row to --out. `--sweep` first times the
attention kernels under several tile configs (BLOCK_M/BLOCK_N, warps, stages, splits).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from asgl.kernels.triton.activation import silu_and_mul  # noqa: E402
from asgl.kernels.triton.decode_attention import (decode_attention, decode_scratch,  # noqa: E402
                                                  num_kv_splits)
from asgl.kernels.triton.extend_attention import (build_schedule, extend_attention,  # noqa: E402
                                                  tokens_per_block)
from asgl.kernels.triton.norm import rmsnorm  # noqa: E402
from asgl.kernels.triton.rotary import rotary_embedding  # noqa: E402
from asgl.layers.activation import SiluAndMul  # noqa: E402
from asgl.layers.norm import RMSNorm  # noqa: E402
from asgl.layers.rotary import RotaryEmbedding  # noqa: E402

H, HKV, D, HIDDEN, INTER = 32, 8, 128, 4096, 14336  # Llama-3.1-8B
DT = torch.bfloat16
DEV = torch.device("cuda")


@dataclass
class Row:
    kernel: str
    shape: str
    impl: str
    ms: float
    metric: str  # "GB/s" or "TFLOP/s"
    value: float
    ceiling_frac: float


def bench(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def num_sets(set_bytes: int) -> int:
    """Input sets to rotate through so that together they are 4x the L2 cache."""
    l2 = torch.cuda.get_device_properties(DEV).L2_cache_size
    return max(1, min(8, -(-4 * l2 // max(1, set_bytes))))


def time_calls(calls: list[Callable[[], object]]) -> float:
    """Median ms of one call: a CUDA graph of all `calls` (one per input set), replayed."""
    for c in calls:  # compile and warm up outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return bench(graph.replay) / len(calls)


def measure_ceilings() -> tuple[float, float]:
    """(GB/s of a 1 GiB device-to-device copy counting read + write, bf16 matmul TFLOP/s
    of 8192^3 on random data)."""
    def copy_gbs() -> float:
        src = torch.randn(2**29, device=DEV, dtype=DT)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 2 / bench(lambda: dst.copy_(src)) / 1e6

    n = 8192
    x, y = (torch.randn(n, n, device=DEV, dtype=DT) for _ in range(2))
    return copy_gbs(), 2 * n**3 / bench(lambda: x @ y) / 1e9


def _pool(seq_lens: list[int]):
    """A KV pool with each request's slots shuffled across it, and its req_to_token."""
    total = sum(seq_lens)
    k_buf = torch.randn(total + 1, HKV, D, device=DEV, dtype=DT)
    v_buf = torch.randn(total + 1, HKV, D, device=DEV, dtype=DT)
    slots = torch.randperm(total, device=DEV) + 1
    r2t = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int64, device=DEV)
    off = 0
    for i, n in enumerate(seq_lens):
        r2t[i, :n] = slots[off:off + n]
        off += n
    return k_buf, v_buf, r2t


def _ivec(v: list[int]) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int64, device=DEV)


def _kv_bytes(seq_lens: list[int]) -> int:
    return sum(seq_lens) * HKV * 2 * D * 2


def extend_calls(prefix: int, ext: int, batch: int,
                 config: Optional[tuple[int, int, int, int]] = None) -> list[Callable]:
    seqs = [prefix + ext] * batch
    exts = [ext] * batch
    tok_m = tokens_per_block(D, D, H // HKV, DT, config[0] if config else None)
    sched = build_schedule(exts, tok_m, DEV)
    meta = (_ivec(list(range(batch))), _ivec([prefix] * batch), _ivec(exts),
            _ivec([i * ext for i in range(batch)]), sched)
    calls = []
    for _ in range(num_sets(_kv_bytes(seqs))):
        k_buf, v_buf, r2t = _pool(seqs)
        q = torch.randn(ext * batch, H, D, device=DEV, dtype=DT)
        out = torch.empty_like(q)
        calls.append(lambda q=q, k=k_buf, v=v_buf, o=out, r=r2t: extend_attention(
            q, k, v, o, r, *meta, sm_scale=D ** -0.5, config=config))
    return calls


def extend_flops(prefix: int, ext: int, batch: int) -> int:
    # Causal: query i of a request sees prefix + i + 1 keys; QK^T and PV, 2 FLOP per MAC.
    return 4 * batch * (ext * prefix + ext * (ext + 1) // 2) * H * D


def bench_extend(prefix: int, ext: int, batch: int, peak_tflops: float) -> list[Row]:
    flops = extend_flops(prefix, ext, batch)
    ms = time_calls(extend_calls(prefix, ext, batch))
    shape = f"B={batch} prefix={prefix} new={ext}"
    rows = [Row("extend_attn", shape, "triton", ms, "TFLOP/s", flops / ms / 1e9,
                flops / ms / 1e9 / peak_tflops)]
    if prefix == 0:  # the same work through torch SDPA (flash) on contiguous [B, H, S, D]
        calls = []
        for _ in range(num_sets(_kv_bytes([ext] * batch))):
            qs = torch.randn(batch, H, ext, D, device=DEV, dtype=DT)
            ks, vs = (torch.randn(batch, HKV, ext, D, device=DEV, dtype=DT) for _ in range(2))
            calls.append(lambda qs=qs, ks=ks, vs=vs: F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, enable_gqa=True))
        ms2 = time_calls(calls)
        rows.append(Row("extend_attn", shape, "torch sdpa (contiguous)", ms2, "TFLOP/s",
                        flops / ms2 / 1e9, flops / ms2 / 1e9 / peak_tflops))
    return rows


def decode_calls(batch: int, seq: int, splits: int,
                 config: Optional[tuple[int, int, int]] = None) -> list[Callable]:
    rpi, lens = _ivec(list(range(batch))), _ivec([seq] * batch)
    mid = decode_scratch(batch, H, splits, D, DEV)
    calls = []
    for _ in range(num_sets(_kv_bytes([seq] * batch))):
        k_buf, v_buf, r2t = _pool([seq] * batch)
        q = torch.randn(batch, H, D, device=DEV, dtype=DT)
        out = torch.empty_like(q)
        calls.append(lambda q=q, k=k_buf, v=v_buf, o=out, r=r2t: decode_attention(
            q, k, v, o, r, rpi, lens, sm_scale=D ** -0.5, num_splits=splits, mid=mid,
            config=config))
    return calls


def default_splits(batch: int, seq: int, waves: int = 2) -> int:
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    return num_kv_splits(batch, HKV, seq, num_sms=sms, waves=waves)


def bench_decode(batch: int, seq: int, peak_gbs: float) -> list[Row]:
    splits = default_splits(batch, seq)
    ms = time_calls(decode_calls(batch, seq, splits))
    nbytes = _kv_bytes([seq] * batch) + batch * seq * 8  # K, V and the slot ids
    return [Row("decode_attn", f"B={batch} seq={seq} splits={splits}", "triton", ms, "GB/s",
                nbytes / ms / 1e6, nbytes / ms / 1e6 / peak_gbs)]


def _pair(kernel: str, shape: str, nbytes: int, peak_gbs: float, ours: list[Callable],
          torch_impl: list[Callable], ours_name: str = "triton") -> list[Row]:
    rows = []
    for impl, calls in ((ours_name, ours), ("torch layer", torch_impl)):
        ms = time_calls(calls)
        rows.append(Row(kernel, shape, impl, ms, "GB/s", nbytes / ms / 1e6,
                        nbytes / ms / 1e6 / peak_gbs))
    return rows


def bench_norm(tokens: int, peak_gbs: float) -> list[Row]:
    layer = RMSNorm(HIDDEN, 1e-5, params_dtype=DT).to(DEV)
    nbytes = 4 * tokens * HIDDEN * 2 + HIDDEN * 2  # read x, residual; write out, residual
    sets = [(torch.randn(tokens, HIDDEN, device=DEV, dtype=DT),
             torch.randn(tokens, HIDDEN, device=DEV, dtype=DT)) for _ in range(num_sets(nbytes))]
    ours = [lambda x=x, r=r: rmsnorm(x, layer.weight, 1e-5, r) for x, r in sets]
    ref = [lambda x=x, r=r: layer(x, r) for x, r in sets]
    return _pair("add_rmsnorm", f"T={tokens} hidden={HIDDEN}", nbytes, peak_gbs, ours, ref)


def bench_rotary(tokens: int, peak_gbs: float) -> list[Row]:
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    rope = RotaryEmbedding(D, D, 131072, 500000.0, True, scaling).to(DEV)
    nbytes = 2 * tokens * (H + HKV) * D * 2 + tokens * (D * 4 + 8)  # q, k in+out; cos/sin
    sets = []
    for _ in range(num_sets(nbytes)):
        qkv = torch.randn(tokens, (H + 2 * HKV) * D, device=DEV, dtype=DT)
        pos = torch.randint(0, 131072, (tokens,), device=DEV)
        sets.append((pos, qkv[:, :H * D], qkv[:, H * D:(H + HKV) * D]))
    ours = [lambda p=p, q=q, k=k: rotary_embedding(p, q, k, rope.cos_sin_cache, D, True)
            for p, q, k in sets]
    ref = [lambda p=p, q=q, k=k: rope(p, q, k) for p, q, k in sets]
    return _pair("rotary", f"T={tokens} q={H}x{D} k={HKV}x{D}", nbytes, peak_gbs, ours, ref,
                 "triton (in place)")


def bench_silu(tokens: int, peak_gbs: float) -> list[Row]:
    nbytes = 3 * tokens * INTER * 2
    layer = SiluAndMul()
    xs = [torch.randn(tokens, 2 * INTER, device=DEV, dtype=DT) for _ in range(num_sets(nbytes))]
    return _pair("silu_and_mul", f"T={tokens} d={INTER}", nbytes, peak_gbs,
                 [lambda x=x: silu_and_mul(x) for x in xs], [lambda x=x: layer(x) for x in xs])


# Candidates around the defaults (the first of each list); an earlier sweep on an H100 also
# tried (128, 64|128, 8, 2|3), (128|64, 64, 4, 3), (64, 128, 4, 3) for extend and BLOCK_N
# 32/128 with 2-8 warps for decode, all slower (bench/RESULTS.md).
EXTEND_CONFIGS = [(128, 32, 4, 3), (128, 32, 4, 4), (128, 32, 8, 3), (128, 16, 4, 3),
                  (256, 32, 8, 3), (64, 32, 4, 3)]
DECODE_CONFIGS = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (64, 8, 3)]


def sweep() -> list[str]:
    """Time the attention kernels under each candidate config; returns printable lines."""
    lines = []
    ext_shapes = [(0, 1024, 16), (2048, 512, 8)]
    lines.append("extend TFLOP/s per config (BLOCK_M, BLOCK_N, warps, stages): "
                 + ", ".join(f"B={b} prefix={p} new={e}" for p, e, b in ext_shapes))
    for cfg in EXTEND_CONFIGS:
        vals = []
        for p, e, b in ext_shapes:
            try:
                ms = time_calls(extend_calls(p, e, b, cfg))
                vals.append(f"{extend_flops(p, e, b) / ms / 1e9:.0f}")
            except Exception as exc:  # out of resources for this tile, say
                vals.append(f"fail({type(exc).__name__})")
        lines.append(f"  {cfg}: " + "  ".join(vals))
    dec_shapes = [(1, 4096), (1, 32768), (16, 8192), (64, 2048), (256, 1024)]
    for waves in (2, 8):
        lines.append(f"decode GB/s per config (BLOCK_N, warps, stages), waves={waves}: "
                     + ", ".join(f"B={b} seq={s} splits={default_splits(b, s, waves)}"
                                 for b, s in dec_shapes))
        for cfg in DECODE_CONFIGS:
            vals = []
            for b, s in dec_shapes:
                try:
                    ms = time_calls(decode_calls(b, s, default_splits(b, s, waves), cfg))
                    vals.append(f"{(_kv_bytes([s] * b) + b * s * 8) / ms / 1e6:.0f}")
                except Exception as exc:
                    vals.append(f"fail({type(exc).__name__})")
            lines.append(f"  {cfg}: " + "  ".join(vals))
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="append one JSON line per row to this file")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--sweep", action="store_true", help="first time tile configs")
    ap.add_argument("--measure-ceilings", action="store_true",
                    help="measure copy GB/s and matmul TFLOP/s here instead of 3000 / 800")
    ap.add_argument("--peak-gbs", type=float, default=3000.0)
    ap.add_argument("--peak-tflops", type=float, default=800.0)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    gbs, tflops = args.peak_gbs, args.peak_tflops
    if args.measure_ceilings:
        gbs, tflops = measure_ceilings()
        print(f"measured ceilings: copy {gbs:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    if args.sweep:
        print("\n".join(sweep()), flush=True)
    rows: list[Row] = []
    rows += bench_extend(0, 1024, 16, tflops)
    rows += bench_extend(2048, 512, 8, tflops)
    if not args.quick:
        rows += bench_extend(0, 4096, 2, tflops)
    decode_shapes = [(1, 4096), (64, 2048), (256, 1024)]
    if not args.quick:
        decode_shapes += [(1, 32768), (16, 8192)]
    for b, s in decode_shapes:
        rows += bench_decode(b, s, gbs)
    for t in ([256, 8192] if not args.quick else [8192]):
        rows += bench_norm(t, gbs)
    rows += bench_rotary(8192, gbs)
    rows += bench_silu(4096, gbs)

    card = torch.cuda.get_device_name(DEV)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**asdict(r), "card": card, "date": stamp,
                                    "triton": triton.__version__, "torch": torch.__version__,
                                    "peak_gbs": gbs, "peak_tflops": tflops}) + "\n")
    print(f"\n{card}, torch {torch.__version__}, triton {triton.__version__}, {stamp}")
    print(f"ceilings: {gbs:.0f} GB/s, {tflops:.0f} TFLOP/s (bf16)")
    print("| kernel | shape | impl | median ms | achieved | of ceiling |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.kernel} | {r.shape} | {r.impl} | {r.ms:.4f} | {r.value:,.0f} {r.metric} "
              f"| {100 * r.ceiling_frac:.0f}% |")


if __name__ == "__main__":
    main()
