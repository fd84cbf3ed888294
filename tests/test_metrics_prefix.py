"""Issue 24, part 5: --metrics-prefix sglang | vllm | asgl. The series that SGLang's and
vLLM's Grafana dashboards query exist under their names, labelled with the served
model_name (vLLM: and engine), with those servers' histogram buckets (SGLang's
production_metrics.md; vLLM's v1 Prometheus logger); asgl keeps its own names.
"""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from asgl.config import EngineConfig
from asgl.server.app import build_app
from compat_fakes import ScriptedEngine

VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_E2E = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
SGLANG_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 30.0]
SGLANG_TPOT = [0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5]

# series the dashboards query (SGLang's examples/monitoring grafana dashboard; vLLM's
# examples/online_serving/prometheus_grafana dashboard)
DASHBOARD = {
    "sglang": ["sglang:prompt_tokens_total", "sglang:generation_tokens_total",
               "sglang:time_to_first_token_seconds_bucket",
               "sglang:e2e_request_latency_seconds_bucket",
               "sglang:time_per_output_token_seconds_bucket", "sglang:num_running_reqs",
               "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate",
               "sglang:num_used_tokens"],
    "vllm": ["vllm:prompt_tokens_total", "vllm:generation_tokens_total",
             "vllm:time_to_first_token_seconds_bucket",
             "vllm:e2e_request_latency_seconds_bucket",
             "vllm:time_per_output_token_seconds_bucket",
             "vllm:inter_token_latency_seconds_bucket",
             "vllm:request_queue_time_seconds_bucket", "vllm:num_requests_running",
             "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "vllm:gpu_cache_usage_perc",
             "vllm:request_success_total", "vllm:prefix_cache_queries_total",
             "vllm:prefix_cache_hits_total"],
}


async def _scrape(prefix: str) -> dict[str, list]:
    engine = ScriptedEngine(lambda p: "four words of output")
    app = build_app(engine, EngineConfig(metrics_prefix=prefix, served_model_name="tiny-llm"))
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.post(server.make_url("/v1/chat/completions"), json={
                "messages": [{"role": "user", "content": "hi"}]})
            assert r.status == 200
            text = await (await s.get(server.make_url("/metrics"))).text()
    finally:
        await server.close()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


@pytest.mark.parametrize("prefix", ["sglang", "vllm"])
async def test_dashboard_series_with_model_name(prefix):
    samples = await _scrape(prefix)
    for name in DASHBOARD[prefix]:
        assert name in samples, name
        for s in samples[name]:
            assert s.labels["model_name"] == "tiny-llm", (name, s.labels)
            if prefix == "vllm":
                assert s.labels["engine"] == "0"
    assert not any(n.startswith("asgl:") for n in samples)
    tokens = samples[f"{prefix}:generation_tokens_total"][0].value
    assert tokens == len("four words of output")  # one byte token each
    ttft = [s for s in samples[f"{prefix}:time_to_first_token_seconds_bucket"]]
    bounds = [float(s.labels["le"]) for s in ttft if s.labels["le"] != "+Inf"]
    assert bounds == (VLLM_TTFT if prefix == "vllm" else SGLANG_TTFT)
    assert ttft[-1].value == 1  # the +Inf bucket counts the one request
    if prefix == "vllm":
        e2e = [float(s.labels["le"]) for s in samples["vllm:e2e_request_latency_seconds_bucket"]
               if s.labels["le"] != "+Inf"]
        assert e2e == VLLM_E2E
        ok = samples["vllm:request_success_total"]
        assert [(s.labels["finished_reason"], s.value) for s in ok] == [("stop", 1.0)]
    else:
        rows = samples["sglang:time_per_output_token_seconds_bucket"]
        tpot = [float(s.labels["le"]) for s in rows if s.labels["le"] != "+Inf"]
        assert tpot == SGLANG_TPOT


async def test_asgl_names_unchanged():
    samples = await _scrape("asgl")
    assert samples["asgl:generation_tokens_total"][0].labels == {}
    assert "asgl:num_running_reqs" in samples and "asgl:kv_cache_usage_ratio" in samples
    assert not any(n.startswith(("vllm:", "sglang:")) for n in samples)


def test_unknown_prefix_is_a_config_error():
    from asgl.config import EngineConfig as Cfg

    with pytest.raises(SystemExit):
        Cfg.from_cli(["--metrics-prefix", "tgi"])
    assert Cfg.from_cli(["--metrics-prefix", "vllm"]).metrics_prefix == "vllm"


def test_buffered_itl_exports_what_per_value_observes_export():
    """The inter-token histogram counts its values at render time (a list append per
    chunk on the event loop); the exposition equals prometheus_client's own observe."""
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from asgl.server.metrics import BufferedHistogram

    buckets = (0.001, 0.005, 0.01, 0.05, 0.1, 1.0)
    ra, rb = CollectorRegistry(), CollectorRegistry()
    plain = Histogram("itl", "d", ["model_name"], buckets=buckets, registry=ra).labels("m")
    buffered = BufferedHistogram(
        Histogram("itl", "d", ["model_name"], buckets=buckets, registry=rb).labels("m"))
    rng = random.Random(0)
    # on a bound (le is inclusive), below the first, above the last, and many in between
    values = [0.005, 0.0, 1.0, 3.0] + [rng.random() ** 3 for _ in range(5000)]
    for v in values:
        plain.observe(v)
        buffered.observe(v)  # 4,096 of them are counted by the automatic flush
    buffered.flush()
    def series(r):
        out = {}
        for line in generate_latest(r).decode().splitlines():
            if line and not line.startswith("#") and "_created" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    a, b = series(ra), series(rb)
    assert a.keys() == b.keys() and len(a) == len(buckets) + 3  # +Inf, _count, _sum
    for name in a:  # counts exact; the sum up to summation order
        assert a[name] == pytest.approx(b[name], rel=1e-12, abs=0), name
