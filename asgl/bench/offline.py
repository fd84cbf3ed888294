"""Offline throughput: a reference workload through the in-process Engine.

    asgl bench offline --model-path llama-3.1-8b --load-format dummy --workload W400 \\
        --output results.jsonl [--detokenize --tokenizer-path DIR] [any engine option]

(also `python -m asgl.bench_offline_throughput` or `python bench/offline.py`)

All requests are submitted at once (greedy, ignore_eos); reports output and total tok/s
over the wall time from the first submission to the last completion, the engine's
start-up time, and from the GPU path: the share of decode steps replayed from CUDA
graphs, the GPU's idle share between steps, and the event loop's CPU time per decode
step (schedule + submit + apply) for large decode batches. Without --detokenize the
tokenizer is not loaded (as vLLM's figures were taken); with it, every token is
detokenized incrementally as in serving.
"""

from __future__ import annotations

import time

_T_PROCESS = time.perf_counter()  # start-up is counted from here (imports included)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
from typing import Optional  # noqa: E402

from asgl.bench.one_batch import BENCH_GROUPS  # noqa: E402
from asgl.bench.workloads import append_record, make_workload  # noqa: E402


class LoopTimer:
    """CPU time the event loop spends per step in schedule / submit / apply, by batch."""

    def __init__(self, engine) -> None:
        self.records: list[tuple[bool, int, float, float]] = []  # decode?, size, cpu, wall
        self._pending: dict[int, list[float]] = {}
        sched = engine.scheduler
        orig_schedule, orig_submit, orig_apply = sched.schedule, engine._submit_step, engine._apply

        def schedule(*a, **k):
            c, w = time.thread_time(), time.perf_counter()
            batch = orig_schedule(*a, **k)
            if hasattr(batch, "forward"):
                self._pending[id(batch)] = [time.thread_time() - c, time.perf_counter() - w]
            return batch

        def submit(batch):
            c, w = time.thread_time(), time.perf_counter()
            fut = orig_submit(batch)
            acc = self._pending.setdefault(id(batch), [0.0, 0.0])
            acc[0] += time.thread_time() - c
            acc[1] += time.perf_counter() - w
            return fut

        def apply(batch, out):
            c, w = time.thread_time(), time.perf_counter()
            orig_apply(batch, out)
            acc = self._pending.pop(id(batch), [0.0, 0.0])
            self.records.append((batch.decode_only, len(batch.reqs),
                                 acc[0] + time.thread_time() - c, acc[1] + time.perf_counter() - w))

        sched.schedule, engine._submit_step, engine._apply = schedule, submit, apply
        self._restore = lambda: (delattr(sched, "schedule"), delattr(engine, "_submit_step"),
                                 delattr(engine, "_apply"))

    def restore(self) -> None:
        self._restore()

    def summary(self, lo: int = 192, hi: int = 320) -> dict:
        dec = [r for r in self.records if r[0]]
        big = [r for r in dec if lo <= r[1] <= hi]
        out = {"decode_steps_timed": len(dec)}
        if dec:
            out["loop_cpu_ms_per_decode_step"] = 1e3 * statistics.mean(r[2] for r in dec)
        if big:
            out[f"loop_cpu_ms_per_decode_step_bs{lo}_{hi}"] = 1e3 * statistics.mean(r[2] for r in big)
            out[f"loop_wall_ms_per_decode_step_bs{lo}_{hi}"] = 1e3 * statistics.mean(r[3] for r in big)
            out[f"mean_bs_{lo}_{hi}"] = statistics.mean(r[1] for r in big)
            out[f"steps_bs_{lo}_{hi}"] = len(big)
        return out


async def run(args: argparse.Namespace, cfg) -> list[dict]:
    """Start one engine, then run each workload in turn (one record each)."""
    from asgl.engine.loop.engine import Engine

    t0 = time.perf_counter()
    engine = await Engine(cfg).start()
    startup = time.perf_counter() - t0
    ready_since_process = time.perf_counter() - _T_PROCESS
    records = []
    for name in args.workload:
        record = await run_workload(engine, name, args.max_prompts, args.detokenize)
        record.update({"startup_s": round(startup, 1),
                       "ready_since_process_s": round(ready_since_process, 1)})
        records.append(record)
        _print(record)
    await engine.shutdown()
    return records


async def run_workload(engine, name: str, max_prompts: int, detokenize: bool) -> dict:
    reqs = make_workload(name, engine.vocab_size)
    if max_prompts:
        reqs = reqs[:max_prompts]
    runner = engine.runner
    timer = LoopTimer(engine)
    if runner.on_cuda:
        runner.gpu_stats.reset()

    async def one(r):
        sp = {"max_new_tokens": r.output_len, "ignore_eos": True, "temperature": 0.0}
        return await engine.generate(input_ids=r.input_ids, sampling_params=sp)

    t1 = time.perf_counter()
    outs = await asyncio.gather(*(one(r) for r in reqs))
    elapsed = time.perf_counter() - t1
    timer.restore()
    out_tokens = sum(o.completion_tokens for o in outs)
    in_tokens = sum(len(r.input_ids) for r in reqs)
    record = {
        "bench": "offline", "engine": "asgl", "workload": name,
        "num_requests": len(reqs), "detokenize": detokenize,
        "attention_backend": runner.attn_backend.name,
        "cuda_graph": runner.graph_runner is not None,
        "elapsed_s": round(elapsed, 3), "output_tokens": out_tokens,
        "output_tokens_expected": sum(r.output_len for r in reqs), "prompt_tokens": in_tokens,
        "cached_tokens": sum(o.cached_tokens or 0 for o in outs),
        "output_tok_s": round(out_tokens / elapsed, 1),
        "total_tok_s": round((out_tokens + in_tokens) / elapsed, 1),
        "kv_tokens": engine.memory.capacity,
    }
    if len(reqs) == 1:
        record["decode_ms_per_token"] = round(1e3 * elapsed / max(out_tokens, 1), 3)
    if runner.on_cuda:
        record.update(runner.gpu_stats.summary())
    record.update(timer.summary())
    return record


def _print(record: dict) -> None:
    gpu = (f" graphs {record.get('graph_share', 0):.0%} idle {record.get('gpu_idle_share', 0):.1%}"
           if "graph_share" in record else "")
    print(f"[offline] {record['workload']} ({record['attention_backend']}, "
          f"detok={record['detokenize']}): {record['output_tok_s']:,.0f} out tok/s, "
          f"{record['total_tok_s']:,.0f} total tok/s, {record['elapsed_s']:.2f}s{gpu}", flush=True)


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    from asgl.config import EngineConfig

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", default=["W400"],
                        choices=["W1", "W400", "W1000", "WP"], help="run in turn, one engine")
    parser.add_argument("--max-prompts", type=int, default=0, help="use only the first N")
    parser.add_argument("--detokenize", action="store_true",
                        help="load the tokenizer and detokenize every token")
    parser.add_argument("--output", "--out", dest="out", default=None,
                        help="append a JSON line per workload to this file (default: print only)")
    parser.add_argument("--tag", default="", help="free text stored with the record")
    EngineConfig.add_cli_args(parser, groups=BENCH_GROUPS)
    args = parser.parse_args(argv)
    if not args.detokenize:
        args.skip_tokenizer_init = True
    cfg = EngineConfig.from_namespace(args)
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {k: v for k, v in vars(args).items()
               if k in ("attention_backend", "disable_cuda_graph", "disable_radix_cache",
                        "disable_overlap_schedule", "max_running_requests", "cuda_graph_max_bs",
                        "chunked_prefill_size", "enable_torch_compile")}
    for record in asyncio.run(run(args, cfg)):
        record.update({"tag": args.tag, "options": options})
        append_record(args.out, record)


if __name__ == "__main__":
    main()
