"""Greedy outputs with the radix cache on and off, on a shared-prefix workload.

Where the two differ, the first differing position is reported with the top-2 logprob
gap there (from the cache-off run): in bf16 a divergence is expected only at near-ties.

    python bench/radix_equal.py --model-path llama-3.1-8b --load-format dummy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asgl import Engine, EngineConfig  # noqa: E402


async def run(cfg: EngineConfig, prompts: list[list[int]], max_new: int) -> list:
    async with Engine(cfg) as engine:
        params = {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}
        outs = await asyncio.gather(*(engine.generate(
            input_ids=p, sampling_params=params, return_logprob=True, top_logprobs_num=2)
            for p in prompts))
        return [(o.output_ids, o.output_top_logprobs, o.cached_tokens) for o in outs]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--doc-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rng = random.Random(3)
    docs = [[rng.randrange(100, 30000) for _ in range(args.doc_len)] for _ in range(args.docs)]
    prompts = [d + [rng.randrange(100, 30000) for _ in range(32)]
               for d in docs for _ in range(args.questions)]
    rng.shuffle(prompts)
    results = {}
    for cache in (True, False):
        cfg = EngineConfig(model_path=args.model_path, load_format=args.load_format,
                           dtype=args.dtype, attention_backend=args.attention_backend,
                           disable_radix_cache=not cache, log_level="warning",
                           skip_tokenizer_init=True)  # token ids in, token ids out
        results[cache] = asyncio.run(run(cfg, prompts, args.max_new_tokens))
    identical, gaps = 0, []
    for (on_ids, _, _), (off_ids, off_top, _) in zip(results[True], results[False]):
        if on_ids == off_ids:
            identical += 1
            continue
        i = next(k for k, (a, b) in enumerate(zip(on_ids, off_ids)) if a != b)
        top = off_top[i]
        gaps.append(round(top[0][0] - top[1][0], 5))
    row = {"check": "radix_on_off_greedy", "requests": len(prompts), "identical": identical,
           "divergence_top2_gaps": sorted(gaps),
           "cached_tokens_on": sum(c for _, _, c in results[True]),
           "model": args.model_path or "smollm2", "dtype": args.dtype,
           "attention_backend": args.attention_backend}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
