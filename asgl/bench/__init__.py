"""Benchmarks installed with the package: `asgl bench serving | one-batch | offline`.

- serving: requests against a running server (any OpenAI-compatible one), like
  `python -m sglang.bench_serving`; imports nothing heavy.
- one-batch: static-batch latency of the model runner, like `sglang.bench_one_batch`.
- offline: a reference workload through the in-process Engine, like
  `sglang.bench_offline_throughput`.

Each writes its JSON lines where `--output` says, and nowhere without it.
"""

from __future__ import annotations

from typing import Callable, Optional

# `asgl bench NAME` -> module of asgl.bench whose main(argv, prog) runs it
BENCHES: dict[str, str] = {"serving": "serving", "one-batch": "one_batch",
                           "offline": "offline"}


def runner(name: str) -> Callable[[Optional[list[str]], Optional[str]], object]:
    import importlib

    return importlib.import_module(f"asgl.bench.{BENCHES[name]}").main
