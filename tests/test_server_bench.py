"""bench/serving.py against a live `asgl serve`, with the native and the OpenAI backends."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from server_fixture import REPO, ServerProcess, main_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_serving", os.path.join(REPO, "bench", "serving.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend, dataset", [("asgl", "random"), ("openai", "sharegpt"),
                                              ("openai-chat", "random")])
def test_bench_serving(main_server: ServerProcess, tmp_path, backend, dataset):
    bench = _bench_module()
    out = tmp_path / "results.jsonl"
    argv = ["--base-url", main_server.url, "--backend", backend, "--dataset", dataset,
            "--num-prompts", "6", "--input-len", "32", "--output-len", "4",
            "--request-rate", "50", "--max-concurrency", "4", "--output-file", str(out),
            "--disable-tqdm"]
    summary = bench.main(argv)
    assert summary["completed"] == 6 and summary["failed"] == 0, summary["errors"]
    assert summary["total_output_tokens"] == 6 * 4  # --ignore-eos is the default
    assert summary["output_token_throughput"] > 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        d = summary[key]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"], (key, d)
    bench.main(argv)  # a second run appends
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["config"]["backend"] == backend
