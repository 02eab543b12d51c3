"""Prometheus metrics of one server (its own registry, so several apps can live in
one process, as in tests)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine import Engine

# Latency buckets in seconds: from a fast decode step to a long queue wait.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.5, 5)


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "zse_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("zse_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("zse_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "zse_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "zse_inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        # Read from the engine when scraped.
        limits = engine.limits
        Gauge("zse_running_sequences", "Sequences being generated", registry=r).set_function(
            lambda: engine.stats()["running"]
        )
        Gauge("zse_waiting_requests", "Requests waiting to start", registry=r).set_function(
            lambda: engine.stats()["waiting"]
        )
        Gauge(
            "zse_kv_cache_usage_ratio",
            "Share of the KV-cache blocks held by sequences",
            registry=r,
        ).set_function(lambda: engine.stats()["kv_blocks_used"] / limits["kv_blocks"])
        _EngineCounter(
            engine,
            "zse_prefix_cache_query_tokens",
            "Prompt positions looked up in the prefix cache",
            "prefix_query_tokens",
            registry=r,
        )
        _EngineCounter(
            engine,
            "zse_prefix_cache_hit_tokens",
            "Prompt positions found in the prefix cache (not computed again)",
            "prefix_hit_tokens",
            registry=r,
        )
        _EngineCounter(
            engine,
            "zse_preemptions",
            "Sequences sent back to the queue for lack of KV blocks",
            "preemptions",
            registry=r,
        )
        Gauge("zse_kv_cache_capacity_tokens", "KV-cache budget in token positions", registry=r).set(
            limits["kv_cache_tokens"]
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounter(Collector):
    """A counter the engine keeps (read when scraped, exposed as ``NAME_total``)."""

    def __init__(
        self, engine: Engine, name: str, doc: str, key: str, registry: CollectorRegistry
    ) -> None:
        self.engine, self.name, self.doc, self.key = engine, name, doc, key
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.doc, value=self.engine.stats()[self.key])
