"""Prometheus metrics at GET /metrics, on a private registry (one per app, so tests and
embedders can run several servers in one process).

Two kinds: what the server observes per request (status counts, token counters, latency
histograms: recorded by `generation.Generation` and the metrics middleware), and what the
engine knows now (running/queued requests, KV pool usage, prefix-cache hit rate), read
from the engine only when scraped, so serving pays nothing for them.

`--metrics-prefix` picks the names, labels and histogram buckets (metrics_profiles.py):
`asgl` (ours, unlabelled), or SGLang's (`sglang:`) or vLLM's (`vllm:`) as their Grafana
dashboards query them, every series labelled with `model_name` (and vLLM's `engine`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import numpy as np

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from asgl.server.metrics_profiles import PROFILES, Profile

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Labelled:
    """A metric with labels of its own whose profile labels (model_name) are fixed:
    `.labels(route, status)` as before, the profile's values appended."""

    def __init__(self, metric: Any, base: tuple[str, ...]):
        self._metric, self._base = metric, base

    def labels(self, *values: str) -> Any:
        return self._metric.labels(*values, *self._base)


class BufferedHistogram:
    """A prometheus Histogram whose `observe` is a list append: the event loop records an
    inter-token gap per streamed chunk (hundreds per step), and prometheus_client's observe
    takes a lock and walks the buckets each time (~2 us). The values are counted into the
    histogram's buckets in one vectorized pass when /metrics is rendered (or every 4,096
    values), so what is exported is exactly what per-value observes would export."""

    _FLUSH_AT = 4096

    def __init__(self, histogram: Any):
        self._h = histogram
        self._bounds = np.asarray(histogram._upper_bounds, dtype=np.float64)
        self._values: list[float] = []

    def observe(self, value: float) -> None:
        values = self._values
        values.append(value)
        if len(values) >= self._FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self._values:
            return
        values, self._values = np.asarray(self._values, dtype=np.float64), []
        # bucket i counts values <= bound i (prometheus' "le"), the first bound that holds
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"),
                             minlength=len(self._bounds))
        h = self._h
        for i, c in enumerate(counts[:len(self._bounds)].tolist()):
            if c:
                h._buckets[i].inc(c)
        h._sum.inc(float(values.sum()))


class Metrics:
    def __init__(self, engine_getter: Callable[[], Any] | None = None, prefix: str = "asgl",
                 model_name: str = ""):
        self.profile = p = PROFILES[prefix]
        self.base_labels = dict(p.base_labels(model_name))
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        names, base = list(self.base_labels), tuple(self.base_labels.values())

        def make(kind, key: str, doc: str, labels: tuple[str, ...] = (), buckets=None) -> Any:
            kwargs = {"buckets": buckets} if buckets is not None else {}
            metric = kind(p.name(key), doc, [*labels, *names], registry=r, **kwargs)
            if labels:
                return _Labelled(metric, base) if base else metric
            return metric.labels(*base) if base else metric

        self.requests = make(Counter, "http_requests", "HTTP requests by route and status "
                             "(499: the client went away first)", ("route", "status"))
        self.in_flight = make(Gauge, "http_requests_in_flight", "HTTP requests being handled")
        self.prompt_tokens = make(Counter, "prompt_tokens", "prompt tokens of admitted "
                                  "requests")
        self.generation_tokens = make(Counter, "generation_tokens", "tokens generated")
        self.ttft = make(Histogram, "ttft", "request arrival to first output token",
                         buckets=p.ttft_buckets)
        self.itl = BufferedHistogram(make(Histogram, "itl", "gap between consecutive output "
                                          "tokens of one sequence", buckets=p.itl_buckets))
        self.tpot = make(Histogram, "tpot", "a sequence's mean time per output token after "
                         "its first", buckets=p.itl_buckets)
        self.e2e = make(Histogram, "e2e", "request arrival to its last token",
                        buckets=p.e2e_buckets)
        self.queue_time = make(Histogram, "queue_time", "time a sequence waited before the "
                               "scheduler first admitted it", buckets=p.e2e_buckets)
        self.finished = make(Counter, "request_success", "finished sequences by reason",
                             ("finished_reason",))
        self.rejected = make(Counter, "rejected_requests", "requests refused before reaching "
                             "the engine, by reason", ("reason",))
        if engine_getter is not None:
            r.register(_EngineCollector(engine_getter, p, self.base_labels))

    def render(self) -> bytes:
        self.itl.flush()
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self, engine_getter: Callable[[], Any], profile: Profile,
                 base: dict[str, str]):
        self._engine = engine_getter
        self._p = profile
        self._base = base

    def describe(self) -> list:
        return []  # values depend on a live engine: don't collect at registration

    def collect(self) -> Iterator:
        engine = self._engine()
        if engine is None or getattr(engine, "scheduler", None) is None:
            return
        sched = engine.scheduler
        mem = engine.memory_state()
        capacity = max(1, mem["capacity"])
        used = max(0, capacity - mem["free"] - mem["cached"])
        stats = sched.stats
        hit_rate = stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
        values = {
            "num_running_reqs": (len(sched.running), "sequences in the running batch"),
            "num_queue_reqs": (len(sched.waiting), "sequences waiting to be admitted"),
            "kv_cache_capacity_tokens": (mem["capacity"], "KV pool size in tokens"),
            "kv_cache_usage_ratio": ((capacity - mem["free"]) / capacity,
                                     "share of KV slots not free (in use or cached)"),
            "kv_used_ratio": (used / capacity, "share of KV slots held by running requests"),
            "num_used_tokens": (used, "KV slots held by running requests"),
            "cache_hit_rate": (hit_rate, "share of admitted prompt tokens served from the "
                                         "prefix cache"),
        }
        for key, (value, doc) in values.items():
            for name in self._p.gauge_names(key):
                yield self._gauge(name, doc, value)
        if self._p.kv_states:
            kv = GaugeMetricFamily(self._p.name("kv_cache_tokens"), "KV pool slots by state",
                                   labels=["state", *self._base])
            for state, n in (("free", mem["free"]), ("cached", mem["cached"]),
                             ("used", used)):
                kv.add_metric([state, *self._base.values()], n)
            yield kv
        for key, value, doc in (
                ("prefix_cache_queries", stats.prompt_tokens, "prompt tokens looked up in the "
                                                              "prefix cache"),
                ("prefix_cache_hits", stats.cached_tokens, "prompt tokens found in the prefix "
                                                           "cache"),
                ("retractions", stats.num_retractions, "sequences retracted for memory")):
            family = CounterMetricFamily(self._p.name(key), doc, labels=list(self._base))
            family.add_metric(list(self._base.values()), value)
            yield family

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(self._base))
        family.add_metric(list(self._base.values()), value)
        return family


def metrics_for(engine_getter: Callable[[], Any], prefix: Optional[str],
                model_name: str) -> Metrics:
    return Metrics(engine_getter, prefix or "asgl", model_name)
