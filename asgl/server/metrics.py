"""Prometheus metrics at GET /metrics, on a private registry (one per app, so tests and
embedders can run several servers in one process).

Two kinds: what the server observes per request (status counts, token counters, latency
histograms: recorded by `generation.Generation` and the metrics middleware), and what the
engine knows now (running/queued requests, KV pool usage, prefix-cache hit rate), read
from the engine only when scraped, so serving pays nothing for them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_P = "asgl:"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self, engine_getter: Callable[[], Any] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{_P}http_requests", "HTTP requests by route and status "
                                "(499: the client went away first)", ["route", "status"],
                                registry=r)
        self.in_flight = Gauge(f"{_P}http_requests_in_flight", "HTTP requests being handled",
                               registry=r)
        self.prompt_tokens = Counter(f"{_P}prompt_tokens", "prompt tokens of admitted requests",
                                     registry=r)
        self.generation_tokens = Counter(f"{_P}generation_tokens", "tokens generated",
                                         registry=r)
        self.ttft = Histogram(f"{_P}time_to_first_token_seconds", "request arrival to first "
                              "output token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{_P}inter_token_latency_seconds", "gap between consecutive "
                             "output tokens of one sequence", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{_P}e2e_request_latency_seconds", "request arrival to its last "
                             "token", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{_P}queue_time_seconds", "time a sequence waited before "
                                    "the scheduler first admitted it", buckets=_LATENCY_BUCKETS,
                                    registry=r)
        self.rejected = Counter(f"{_P}rejected_requests", "requests refused before reaching the "
                                "engine, by reason", ["reason"], registry=r)
        if engine_getter is not None:
            r.register(_EngineCollector(engine_getter))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self, engine_getter: Callable[[], Any]):
        self._engine = engine_getter

    def describe(self) -> list:
        return []  # values depend on a live engine: don't collect at registration

    def collect(self) -> Iterator:
        engine = self._engine()
        if engine is None or getattr(engine, "scheduler", None) is None:
            return
        sched = engine.scheduler
        mem = engine.memory_state()
        yield _gauge("num_running_reqs", "sequences in the running batch", len(sched.running))
        yield _gauge("num_queue_reqs", "sequences waiting to be admitted", len(sched.waiting))
        capacity = max(1, mem["capacity"])
        used = capacity - mem["free"] - mem["cached"]
        kv = GaugeMetricFamily(f"{_P}kv_cache_tokens", "KV pool slots by state",
                               labels=["state"])
        kv.add_metric(["free"], mem["free"])
        kv.add_metric(["cached"], mem["cached"])
        kv.add_metric(["used"], max(0, used))
        yield kv
        yield _gauge("kv_cache_capacity_tokens", "KV pool size in tokens", mem["capacity"])
        yield _gauge("kv_cache_usage_ratio", "share of KV slots not free (in use or cached)",
                     (capacity - mem["free"]) / capacity)
        stats = sched.stats
        yield _gauge("cache_hit_rate", "share of admitted prompt tokens served from the prefix "
                     "cache", stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens
                     else 0.0)
        queries = CounterMetricFamily(f"{_P}prefix_cache_queried_tokens", "prompt tokens "
                                      "looked up in the prefix cache")
        queries.add_metric([], stats.prompt_tokens)
        yield queries
        hits = CounterMetricFamily(f"{_P}prefix_cache_hit_tokens", "prompt tokens found in the "
                                   "prefix cache")
        hits.add_metric([], stats.cached_tokens)
        yield hits
        retractions = CounterMetricFamily(f"{_P}retractions", "sequences retracted for memory")
        retractions.add_metric([], stats.num_retractions)
        yield retractions


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{_P}{name}", doc, value=value)
