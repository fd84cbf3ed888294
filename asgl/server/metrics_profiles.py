"""Metric names, labels and histogram buckets per `--metrics-prefix`.

`sglang` and `vllm` follow what those servers export and their Grafana dashboards query:
SGLang's docs/references/production_metrics.md (names, `model_name` label, the bucket
bounds shown there) and vLLM's v1 Prometheus logger (vllm/v1/metrics/loggers.py: names,
`model_name` and `engine` labels, buckets). `asgl` keeps this server's own names,
unlabelled, as before. A key that a profile does not name is exported under the profile's
prefix with asgl's name (asgl-only series such as http_requests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# asgl's own buckets
_ASGL_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ASGL_ITL = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
             0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# SGLang (production_metrics.md)
_SGLANG_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 30.0)
_SGLANG_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0)
_SGLANG_TPOT = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# vLLM (v1 loggers)
_VLLM_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
              5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_VLLM_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0)
_VLLM_LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# asgl's names for every key (the default of every profile)
_ASGL_NAMES = {
    "http_requests": "http_requests", "http_requests_in_flight": "http_requests_in_flight",
    "prompt_tokens": "prompt_tokens", "generation_tokens": "generation_tokens",
    "ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds",
    "tpot": "time_per_output_token_seconds", "e2e": "e2e_request_latency_seconds",
    "queue_time": "queue_time_seconds", "request_success": "request_success",
    "rejected_requests": "rejected_requests", "kv_cache_tokens": "kv_cache_tokens",
    "prefix_cache_queries": "prefix_cache_queried_tokens",
    "prefix_cache_hits": "prefix_cache_hit_tokens", "retractions": "retractions",
}


@dataclass(frozen=True)
class Profile:
    prefix: str
    names: dict[str, str] = field(default_factory=dict)  # key -> name (after the prefix)
    gauges: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> names
    labels: tuple[str, ...] = ()  # profile labels; model_name gets the served name
    engine_label: bool = False  # vLLM's `engine` label ("0": one engine per server)
    kv_states: bool = True
    ttft_buckets: tuple[float, ...] = _ASGL_LATENCY
    itl_buckets: tuple[float, ...] = _ASGL_ITL
    e2e_buckets: tuple[float, ...] = _ASGL_LATENCY

    def name(self, key: str) -> str:
        return self.prefix + self.names.get(key, _ASGL_NAMES.get(key, key))

    def gauge_names(self, key: str) -> tuple[str, ...]:
        return tuple(self.prefix + n for n in self.gauges.get(key, ()))

    def base_labels(self, model_name: str) -> list[tuple[str, str]]:
        out = [("model_name", model_name)] if "model_name" in self.labels else []
        if self.engine_label:
            out.append(("engine", "0"))
        return out


PROFILES: dict[str, Profile] = {
    "asgl": Profile(prefix="asgl:", gauges={
        "num_running_reqs": ("num_running_reqs",), "num_queue_reqs": ("num_queue_reqs",),
        "kv_cache_capacity_tokens": ("kv_cache_capacity_tokens",),
        "kv_cache_usage_ratio": ("kv_cache_usage_ratio",),
        "cache_hit_rate": ("cache_hit_rate",)}),
    "sglang": Profile(
        prefix="sglang:", labels=("model_name",), kv_states=False,
        names={"itl": "inter_token_latency_seconds", "tpot": "time_per_output_token_seconds",
               "queue_time": "queue_time_seconds", "request_success": "num_requests",
               "retractions": "num_retracted_reqs"},
        gauges={"num_running_reqs": ("num_running_reqs",),
                "num_queue_reqs": ("num_queue_reqs",),
                "kv_used_ratio": ("token_usage",), "num_used_tokens": ("num_used_tokens",),
                "kv_cache_capacity_tokens": ("max_total_num_tokens",),
                "cache_hit_rate": ("cache_hit_rate",)},
        ttft_buckets=_SGLANG_TTFT, itl_buckets=_SGLANG_TPOT, e2e_buckets=_SGLANG_E2E),
    "vllm": Profile(
        prefix="vllm:", labels=("model_name",), engine_label=True, kv_states=False,
        names={"queue_time": "request_queue_time_seconds",
               "prefix_cache_queries": "prefix_cache_queries",
               "prefix_cache_hits": "prefix_cache_hits", "retractions": "num_preemptions"},
        gauges={"num_running_reqs": ("num_requests_running",),
                "num_queue_reqs": ("num_requests_waiting",),
                # kv_cache_usage_perc since v0.10; older dashboards read gpu_cache_usage_perc
                "kv_cache_usage_ratio": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
                "cache_hit_rate": ("gpu_prefix_cache_hit_rate",)},
        ttft_buckets=_VLLM_TTFT, itl_buckets=_VLLM_ITL, e2e_buckets=_VLLM_LATENCY),
}
