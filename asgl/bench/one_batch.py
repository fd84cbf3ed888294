"""Static-batch latency, like `sglang.bench_latency`: one prefill of B x input_len random
tokens, then output_len decode steps of the same B requests, each step synchronous.

    asgl bench one-batch --model-path llama-3.1-8b --load-format dummy \\
        --batch-size 1 16 --input-len 1024 --output-len 32 --output results.jsonl

(also `python -m asgl.bench_one_batch` or `python bench/one_batch.py`)

Drives the ModelRunner directly (no scheduler): prefill latency and tok/s, and the
median decode step latency and tok/s per batch size. A short warm-up run comes first.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from typing import Optional

import torch

from asgl.bench.workloads import append_record


# engine options that apply to a benchmark in-process (no HTTP server)
BENCH_GROUPS = ("model", "scheduling", "memory", "parallelism", "kernels", "logging",
                "other")


class StaticBatch:
    """B requests in a runner's pools; builds their prefill and decode ForwardBatches."""

    def __init__(self, runner, req_pool, allocator, bs: int, input_len: int, seed: int):
        self.runner, self.req_pool, self.allocator = runner, req_pool, allocator
        gen = torch.Generator().manual_seed(seed)
        self.prompts = torch.randint(0, runner.vocab_size, (bs, input_len), generator=gen)
        self.rows = [req_pool.alloc() for _ in range(bs)]
        self.slots: list[torch.Tensor] = []
        self.bs, self.seq_len = bs, 0

    def _forward(self, mode, ids: list[int], extend: int):
        from asgl.engine.contracts.forward_batch import ForwardBatch

        bs = self.bs
        slots = self.allocator.alloc(bs * extend)
        assert slots is not None, "KV pool too small for this batch"
        self.slots.append(slots)
        for i, row in enumerate(self.rows):
            self.req_pool.write(row, self.seq_len, slots[i * extend:(i + 1) * extend])
        positions = list(range(self.seq_len, self.seq_len + extend)) * bs
        fb = ForwardBatch.build(
            mode=mode, input_ids=ids, positions=positions, out_cache_loc=slots,
            req_pool_indices=self.rows, prefix_lens=[self.seq_len] * bs,
            extend_lens=[extend] * bs, logits_rows=[(i + 1) * extend - 1 for i in range(bs)],
            sample_rows=list(range(bs)), device=torch.device("cpu"))
        self.seq_len += extend
        return fb

    def step(self, mode, ids: list[int], extend: int) -> list[int]:
        from asgl.engine.contracts.step import StepPlan
        from asgl.engine.sampling.batch import SamplingBatch

        fb = self._forward(mode, ids, extend)
        sampling = SamplingBatch(size=self.bs, vocab_size=self.runner.vocab_size, all_greedy=True)
        out = self.runner.step(StepPlan(forward=fb, sampling=sampling,
                                        table_writes=self.req_pool.take_writes(),
                                        req_to_token=self.req_pool.req_to_token))
        if out.wait is not None:
            out = out.wait()
        return out.next_ids

    def release(self) -> None:
        for s in self.slots:
            self.allocator.free(s)
        for r in self.rows:
            self.req_pool.free(r)


def run_one(runner, req_pool, allocator, bs: int, input_len: int, output_len: int,
            seed: int, prefill_tokens: int = 16384) -> dict:
    from asgl.engine.contracts.forward_batch import ForwardMode

    sb = StaticBatch(runner, req_pool, allocator, bs, input_len, seed)
    sync = torch.cuda.synchronize if runner.on_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    # a big batch's prompts go in chunks of at most `prefill_tokens` per step, as the engine's
    # chunked prefill would send them (one 400k-token extend overruns the attention planner)
    chunk = max(1, min(input_len, prefill_tokens // bs))
    for start in range(0, input_len, chunk):
        part = sb.prompts[:, start:start + chunk]
        ids = sb.step(ForwardMode.EXTEND, part.reshape(-1).tolist(), part.shape[1])
    sync()
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(output_len):
        t = time.perf_counter()
        ids = sb.step(ForwardMode.DECODE, ids, 1)
        steps.append(time.perf_counter() - t)  # the step returns host ids: already synced
    sb.release()
    decode = statistics.median(steps) if steps else float("nan")
    return {"batch_size": bs, "input_len": input_len, "output_len": output_len,
            "prefill_ms": round(1e3 * prefill, 2), "prefill_chunk": chunk,
            "prefill_tok_s": round(bs * input_len / prefill, 1),
            "decode_ms_median": round(1e3 * decode, 3),
            "decode_tok_s": round(bs / decode, 1)}


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    from asgl.config import EngineConfig
    from asgl.engine.scheduler.slots import ReqToTokenPool, TokenSlotAllocator
    from asgl.engine.worker.model_runner import ModelRunner
    from asgl.models.loader import resolve_model

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill-tokens", type=int, default=16384,
                        help="most prompt tokens per prefill step (the batch's prompts are "
                             "sent in chunks of this many tokens in all)")
    parser.add_argument("--output", "--out", dest="out", default=None,
                        help="append JSON lines to this file (default: print only)")
    parser.add_argument("--tag", default="")
    EngineConfig.add_cli_args(parser, groups=BENCH_GROUPS)
    args = parser.parse_args(argv)
    args.skip_tokenizer_init = True
    cfg = EngineConfig.from_namespace(args)
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    runner = ModelRunner(cfg, resolve_model(cfg))
    max_bs = max(args.batch_size)
    ctx = args.input_len + args.output_len + 1
    capacity = min(runner.kv_capacity(), max_bs * ctx + 1024)
    runner.init_memory(capacity, max(max_bs, 2), ctx)
    init_s = time.perf_counter() - t0
    req_pool = ReqToTokenPool(max(max_bs, 2), ctx, track_writes=runner.on_cuda)
    allocator = TokenSlotAllocator(capacity)
    run_one(runner, req_pool, allocator, 1, min(args.input_len, 64), 4, args.seed)  # warm-up
    for bs in args.batch_size:
        rec = run_one(runner, req_pool, allocator, bs, args.input_len, args.output_len, args.seed,
                      args.prefill_tokens)
        rec.update({"bench": "one_batch", "model": cfg.model_path, "dtype": str(runner.dtype),
                    "attention_backend": runner.attn_backend.name,
                    "cuda_graph": runner.graph_runner is not None, "init_s": round(init_s, 1),
                    "tag": args.tag})
        append_record(args.out, rec)
        print(f"[one_batch] bs={bs} in={args.input_len}: prefill {rec['prefill_ms']:.1f} ms "
              f"({rec['prefill_tok_s']:,.0f} tok/s), decode {rec['decode_ms_median']:.2f} ms/step "
              f"({rec['decode_tok_s']:,.1f} tok/s) [{rec['attention_backend']}, "
              f"graphs={rec['cuda_graph']}]", flush=True)


if __name__ == "__main__":
    main()
