"""Does a long prompt stall the requests that are decoding? (chunked prefill)

A few requests decode (streaming); then a prompt of `--prompt-chunks` x the chunk size
arrives. The worst inter-token gap of the decoding requests while it prefills is compared
with the idle gap, with chunking on (--chunk) and off.

    python bench/chunked_prefill.py --chunk 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asgl import Engine, EngineConfig  # noqa: E402


async def measure(cfg: EngineConfig, num_decoding: int, prompt_len: int, seed: int) -> dict:
    rng = random.Random(seed)
    async with Engine(cfg) as engine:
        vocab = min(engine.vocab_size, 32000)
        await engine.generate(input_ids=[100] * 8, sampling_params={"max_new_tokens": 2})
        stamps: list[list[float]] = [[] for _ in range(num_decoding)]
        gpu = engine.runner.gpu_stats if engine.runner.on_cuda else None
        window: dict[str, float] = {}

        async def decode(i: int) -> None:
            ids = [rng.randrange(100, vocab) for _ in range(16)]
            async for _ in engine.generate_stream(input_ids=ids, sampling_params={
                    "max_new_tokens": 400, "ignore_eos": True, "temperature": 0}):
                stamps[i].append(time.perf_counter())
                if "end" in window:
                    break

        async def long_prompt() -> None:
            while min(len(s) for s in stamps) < 20:  # decoding is in its steady state
                await asyncio.sleep(0.01)
            ids = [rng.randrange(100, vocab) for _ in range(prompt_len)]
            if gpu is not None:
                gpu.trace = []
            window["start"] = time.perf_counter()
            await engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
            window["end"] = time.perf_counter()
            if gpu is not None:
                window["trace"] = gpu.trace
                gpu.trace = None

        await asyncio.gather(long_prompt(), *(decode(i) for i in range(num_decoding)))
    idle, during, first = [], [], []
    for i, s in enumerate(stamps):
        for a, b in zip(s, s[1:]):
            gap = b - a
            if b < window["start"]:
                idle.append(gap)
            elif a <= window["end"]:
                during.append(gap)
                if i == 0:
                    first.append(round(gap * 1e3, 2))
    return {"idle_gap_ms": round(statistics.median(idle) * 1e3, 2),
            "worst_gap_during_prefill_ms": round(max(during) * 1e3, 2),
            "median_gap_during_prefill_ms": round(statistics.median(during) * 1e3, 2),
            "prefill_seconds": round(window["end"] - window["start"], 3),
            "gaps_of_request_0_during_prefill_ms": first,
            # GPU: per step from the prompt's arrival to its end (decode?, CUDA graph?,
            # GPU busy ms, GPU idle ms before the step)
            "gpu_steps": window.get("trace")}


async def main_async(args) -> list[dict]:
    rows = []
    for chunk in (args.chunk, -1):
        cfg = EngineConfig(model_path=args.model_path, load_format=args.load_format,
                           device=args.device, chunked_prefill_size=chunk, log_level="warning",
                           skip_tokenizer_init=True)  # token ids in, token ids out
        row = await measure(cfg, args.num_decoding, args.prompt_chunks * args.chunk, args.seed)
        row.update(chunk=chunk, prompt_len=args.prompt_chunks * args.chunk,
                   decoding=args.num_decoding, model=args.model_path or "smollm2")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--prompt-chunks", type=int, default=4)
    p.add_argument("--num-decoding", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = asyncio.run(main_async(args))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    on, off = rows
    print(f"worst gap during a {on['prompt_len']}-token prefill: chunked {on['worst_gap_during_prefill_ms']} ms, "
          f"unchunked {off['worst_gap_during_prefill_ms']} ms "
          f"(ratio {on['worst_gap_during_prefill_ms'] / off['worst_gap_during_prefill_ms']:.2f}); "
          f"idle gap {on['idle_gap_ms']} ms")


if __name__ == "__main__":
    main()
