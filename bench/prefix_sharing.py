"""Prefix-sharing benchmark (RadixAttention's workloads): few-shot, multi-turn chat and
tree-of-thought branching, with the radix cache on and off.

For each workload it reports the prompt tokens, the prompt tokens the cache served against
the optimum (every token computed once: the size of the trie of all prompts), the prefill
tokens actually computed, and throughput.

    python bench/prefix_sharing.py                       # embedded SmolLM2 on this machine
    python bench/prefix_sharing.py --model-path llama-3.1-8b --load-format dummy --scale 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asgl import Engine, EngineConfig  # noqa: E402


def trie_size(prompts: list[list[int]]) -> int:
    """Distinct prefixes over all prompts: what an ideal cache computes."""
    root: dict = {}
    size = 0
    for ids in prompts:
        node = root
        for t in ids:
            if t not in node:
                node[t] = {}
                size += 1
            node = node[t]
    return size


def rand_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def few_shot(rng, vocab, scale):
    """Many questions after one long preamble of worked examples, all at once."""
    preamble = rand_ids(rng, 600 * scale, vocab)
    return [[(0, preamble + rand_ids(rng, 24, vocab))] for _ in range(24 * scale)]


def multi_turn(rng, vocab, scale):
    """Conversations whose every turn resends the history: turn k waits for turn k-1."""
    convs = []
    for _ in range(6 * scale):
        history, turns = rand_ids(rng, 120, vocab), []
        for _ in range(4):
            history = history + rand_ids(rng, 40, vocab)
            turns.append((1, list(history)))
            history = history + rand_ids(rng, 16, vocab)  # stands in for the reply
        convs.append(turns)
    return convs


def tree_of_thought(rng, vocab, scale):
    """A root problem, 4 thoughts on it, 3 refinements of each: prefixes branch."""
    root = rand_ids(rng, 300 * scale, vocab)
    programs = []
    for _ in range(4):
        thought = root + rand_ids(rng, 60, vocab)
        programs.append([(0, thought)] + [(1, thought + rand_ids(rng, 40, vocab)) for _ in range(3)])
    return programs


WORKLOADS = {"few-shot": few_shot, "multi-turn": multi_turn, "tree-of-thought": tree_of_thought}


async def run_workload(engine: Engine, programs, max_new: int) -> dict:
    params = {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}
    stats = engine.scheduler.stats
    steps0, tokens0 = stats.num_steps, stats.num_forward_tokens

    async def program(turns):
        outs = []
        for _, ids in turns:  # sequential within a program, concurrent across programs
            outs.append(await engine.generate(input_ids=ids, sampling_params=params))
        return outs

    t0 = time.perf_counter()
    results = [o for outs in await asyncio.gather(*(program(p) for p in programs)) for o in outs]
    elapsed = time.perf_counter() - t0
    prompts = [ids for p in programs for _, ids in p]
    prompt_tokens = sum(map(len, prompts))
    completion = sum(o.completion_tokens for o in results)
    # every forward token is a prompt token or a decode input (all outputs but the first)
    decode_inputs = completion - len(results)
    computed_prefill = stats.num_forward_tokens - tokens0 - decode_inputs
    return {
        "requests": len(results), "prompt_tokens": prompt_tokens,
        "cached_tokens": sum(o.cached_tokens for o in results),
        "optimal_cached": prompt_tokens - trie_size(prompts),
        "prefill_computed": computed_prefill, "output_tokens": completion,
        "steps": stats.num_steps - steps0, "seconds": round(elapsed, 3),
        "total_tok_s": round((prompt_tokens + completion) / elapsed, 1),
        "output_tok_s": round(completion / elapsed, 1),
    }


async def main_async(args) -> list[dict]:
    rows = []
    for cache_on in (True, False):
        cfg = EngineConfig(model_path=args.model_path, load_format=args.load_format,
                           disable_radix_cache=not cache_on, device=args.device,
                           log_level="warning")
        async with Engine(cfg) as engine:
            vocab = min(engine.vocab_size, 32000)
            # warm-up outside the measurement
            await engine.generate(input_ids=[100, 200, 300], sampling_params={"max_new_tokens": 2})
            engine.memory.flush()
            for name, make in WORKLOADS.items():
                if args.workloads and name not in args.workloads:
                    continue
                programs = make(random.Random(args.seed), vocab, args.scale)
                row = await run_workload(engine, programs, args.max_new_tokens)
                row.update(workload=name, radix_cache=cache_on, model=args.model_path or "smollm2",
                           device=str(engine.runner.device))
                rows.append(row)
                engine.memory.flush()
                print(json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    lines = [f"{'workload':16} {'hit/optimum':>12} {'prefill computed on/off':>24} "
             f"{'cut':>6} {'tok/s on/off':>16} {'speedup':>8}"]
    by = {(r["workload"], r["radix_cache"]): r for r in rows}
    for name in WORKLOADS:
        on, off = by.get((name, True)), by.get((name, False))
        if not on or not off:
            continue
        hit = f"{on['cached_tokens']}/{on['optimal_cached']}"
        cut = 1 - on["prefill_computed"] / max(off["prefill_computed"], 1)
        lines.append(f"{name:16} {hit:>12} {on['prefill_computed']:>11}/{off['prefill_computed']:<12} "
                     f"{cut:>6.1%} {on['total_tok_s']:>7}/{off['total_tok_s']:<8} "
                     f"{on['total_tok_s'] / off['total_tok_s']:>7.2f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", nargs="*")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args()
    rows = asyncio.run(main_async(args))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(summarize(rows))


if __name__ == "__main__":
    main()
