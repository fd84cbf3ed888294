"""Tensor- and data-parallel checks on GPUs (each configuration in a fresh subprocess).

    # TP=N against TP=1: greedy agreement, prompt-logprob difference, offline throughput
    python bench/parallel.py tp --tp 2 --model-path llama-3.1-8b --load-format dummy \\
        --workload W400 --out results.jsonl
    # DP=N against DP=1 on the offline workload (the issue asks for >= 1.8x at DP=2)
    python bench/parallel.py dp --dp 2 --model-path llama-3.1-8b --load-format dummy \\
        --workload W400 --out results.jsonl

Any other option is an engine option (`asgl serve --help`). Runs on the CPU too (with
`--model-path tiny-llama --max-prompts 8`), which is how it was tried before a GPU run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.workloads import append_record, make_workload  # noqa: E402

CHECK_PROMPTS, CHECK_PROMPT_LEN, CHECK_NEW = 8, 96, 32


async def _one(cfg, workload: str, max_prompts: int, check: bool) -> dict:
    """One engine (DPEngine when dp_size > 1): optional agreement probe, then the workload."""
    from asgl.engine.dp.engine import DPEngine
    from asgl.engine.loop.engine import Engine

    t0 = time.perf_counter()
    engine = DPEngine(cfg) if cfg.dp_size > 1 else Engine(cfg)
    await engine.start()
    result: dict = {"startup_s": round(time.perf_counter() - t0, 1)}
    if check:
        rng = random.Random(3)
        prompts = [[rng.randrange(10, engine.vocab_size) for _ in range(CHECK_PROMPT_LEN)]
                   for _ in range(CHECK_PROMPTS)]
        sp = {"max_new_tokens": CHECK_NEW, "ignore_eos": True, "temperature": 0.0}
        outs = await asyncio.gather(*(engine.generate(
            input_ids=p, sampling_params=sp, return_logprob=True, logprob_start_len=0,
            top_logprobs_num=2) for p in prompts))
        result["ids"] = [o.output_ids for o in outs]
        result["gaps"] = [[t[0][0] - t[1][0] for t in o.output_top_logprobs] for o in outs]
        result["prompt_lp"] = [[lp for lp, _ in o.input_token_logprobs if lp is not None]
                               for o in outs]
    reqs = make_workload(workload, engine.vocab_size)[:max_prompts or None]

    async def run(r):
        sp = {"max_new_tokens": r.output_len, "ignore_eos": True, "temperature": 0.0}
        return await engine.generate(input_ids=r.input_ids, sampling_params=sp)

    t1 = time.perf_counter()
    outs = await asyncio.gather(*(run(r) for r in reqs))
    elapsed = time.perf_counter() - t1
    out_tokens = sum(o.completion_tokens for o in outs)
    result.update({"workload": workload, "num_requests": len(reqs), "elapsed_s": round(elapsed, 3),
                   "output_tokens": out_tokens, "output_tok_s": round(out_tokens / elapsed, 1)})
    await engine.shutdown()
    return result


def _child(argv: list[str]) -> None:
    from asgl.config import EngineConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="W400")
    parser.add_argument("--max-prompts", type=int, default=0)
    parser.add_argument("--check", action="store_true")
    EngineConfig.add_cli_args(parser)
    args = parser.parse_args(argv)
    args.skip_tokenizer_init = True
    cfg = EngineConfig.from_namespace(args)
    result = asyncio.run(_one(cfg, args.workload, args.max_prompts, args.check))
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "_child", *argv],
                          stdout=subprocess.PIPE, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"child {argv} failed ({proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def _agreement(ref: dict, got: dict) -> dict:
    """Greedy tokens equal up to the first divergence; a divergence counts as a near-tie
    when the reference's top-2 gap there is below 1e-3 (fp32) / 0.05 (bf16 noise)."""
    same, ties, worst_gap = 0, 0, 0.0
    for a, b, gaps in zip(got["ids"], ref["ids"], ref["gaps"]):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        same += k
        if k < len(b):
            ties += gaps[k] < 0.05
            worst_gap = max(worst_gap, gaps[k])
    diffs = [abs(x - y) for a, b in zip(got["prompt_lp"], ref["prompt_lp"]) for x, y in zip(a, b)]
    total = sum(len(b) for b in ref["ids"])
    return {"greedy_tokens_equal_before_divergence": same, "greedy_tokens": total,
            "divergences": len(ref["ids"]) - sum(1 for a, b in zip(got["ids"], ref["ids"])
                                                 if a == b),
            "divergences_at_near_ties": ties, "largest_gap_at_divergence": worst_gap,
            "prompt_logprob_max_abs_diff": max(diffs) if diffs else 0.0,
            "prompt_logprob_mean_abs_diff": sum(diffs) / len(diffs) if diffs else 0.0}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return _child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["tp", "dp"])
    parser.add_argument("--tp", "--tp-size", dest="tp", type=int, default=2)
    parser.add_argument("--dp", "--dp-size", dest="dp", type=int, default=2)
    parser.add_argument("--workload", default="W400")
    parser.add_argument("--max-prompts", type=int, default=0)
    parser.add_argument("--out", default=None)
    args, engine_args = parser.parse_known_args()
    common = ["--workload", args.workload, "--max-prompts", str(args.max_prompts), *engine_args]
    if args.mode == "tp":
        ref = _run_child(["--check", "--tp-size", "1", *common])
        got = _run_child(["--check", "--tp-size", str(args.tp), *common])
        record = {"bench": "tp", "tp": args.tp, **_agreement(ref, got),
                  "tp1_output_tok_s": ref["output_tok_s"],
                  f"tp{args.tp}_output_tok_s": got["output_tok_s"],
                  "workload": args.workload, "num_requests": got["num_requests"]}
    else:
        one = _run_child(["--dp-size", "1", *common])
        many = _run_child(["--dp-size", str(args.dp), *common])
        record = {"bench": "dp", "dp": args.dp, "dp1_output_tok_s": one["output_tok_s"],
                  f"dp{args.dp}_output_tok_s": many["output_tok_s"],
                  "speedup": round(many["output_tok_s"] / one["output_tok_s"], 2),
                  "workload": args.workload, "num_requests": many["num_requests"]}
    record["engine_args"] = " ".join(engine_args)
    print(json.dumps(record), flush=True)
    append_record(args.out, record)


if __name__ == "__main__":
    main()
