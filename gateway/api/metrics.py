"""Prometheus metrics at ``GET /metrics`` (admin credential: tenants never see each other's
numbers). Request metrics are observed by the access-log middleware; cache and backend gauges
are read at scrape time from their owners (no second bookkeeping). Each app has its own
registry, so several apps in one process do not collide."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from ..backends import Backend
from ..store.health import StoreHealth

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_KNOWN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters", "/v1/route"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tensafe_requests", "HTTP requests by route and outcome",
                                ("path", "status", "code"), registry=self.registry)
        self.ttft = Histogram("tensafe_time_to_first_token_seconds", "Time to first token",
                              ("tenant",), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("tensafe_request_duration_seconds", "Request duration (streams: to the end)",
                                 ("path",), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("tensafe_tokens", "Prompt and completion tokens", ("tenant", "kind"),
                              registry=self.registry)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def observe(self, record: dict[str, Any]) -> None:
        """One access-log record (see ``api.middleware``)."""
        path = record["path"] if record["path"] in _KNOWN_PATHS else "other"  # bounded label values
        tenant = record.get("tenant") or "-"
        self._child(self.requests, path, str(record["status"]), record.get("error_code") or "").inc()
        self._child(self.latency, path).observe(record["latency_ms"] / 1000)
        if "ttft_ms" in record:
            self._child(self.ttft, tenant).observe(record["ttft_ms"] / 1000)
        if "prompt_tokens" in record:
            self._child(self.tokens, tenant, "prompt").inc(record["prompt_tokens"])
            self._child(self.tokens, tenant, "completion").inc(record["completion_tokens"])

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: finding a child by labels costs more than using it."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CacheCollector(Collector):
    """The tiered cache's counters and sizes, read at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        s = self.stats()
        if s is None:
            return
        hits = CounterMetricFamily("tensafe_cache_hits", "Cache hits per tier", labels=("tier",))
        misses = CounterMetricFamily("tensafe_cache_misses", "Cache misses per tier", labels=("tier",))
        for tier in ("cpu", "device"):
            hits.add_metric([tier], s[tier]["hits"])
            misses.add_metric([tier], s[tier]["misses"])
        yield hits
        yield misses
        for name, key, help_text in (("fetches", "fetches", "Disk to CPU opens (verify + decrypt)"),
                                     ("fetch_failures", "fetch_failures", "Failed opens"),
                                     ("loads", "loads", "CPU to slot loads"),
                                     ("offloads", "offloads", "Slot to CPU offloads")):
            yield CounterMetricFamily(f"tensafe_cache_{name}", help_text, value=s[key])
        yield CounterMetricFamily("tensafe_cache_evictions", "CPU tier evictions", value=s["cpu"]["evictions"])
        yield GaugeMetricFamily("tensafe_cache_cpu_bytes", "Decrypted adapter bytes in RAM", value=s["cpu"]["bytes"])
        yield GaugeMetricFamily("tensafe_cache_cpu_budget_bytes", "CPU tier budget", value=s["cpu"]["budget_bytes"])
        yield GaugeMetricFamily("tensafe_cache_cpu_adapters", "Adapters in the CPU tier", value=s["cpu"]["adapters"])
        for name, key in (("fetch", "fetch_latency"), ("load", "load_latency")):
            summary = s[key]
            yield SummaryMetricFamily(f"tensafe_cache_{name}_seconds", f"Adapter {name} latency",
                                      count_value=summary["count"], sum_value=summary["sum_s"])


class BackendCollector(Collector):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Any]:
        c = self.backend.capacity()
        labels = ("backend",)
        for name, value, help_text in (
            ("free_sequence_slots", c.free_sequence_slots, "Free batch slots"),
            ("max_sequence_slots", c.max_sequence_slots, "Batch slots"),
            ("queue_depth", c.queue_depth, "Requests waiting for a batch slot"),
            ("free_adapter_slots", c.free_adapter_slots, "Free adapter slots"),
            ("max_adapter_slots", c.max_adapter_slots, "Adapter slots"),
        ):
            family = GaugeMetricFamily(f"tensafe_backend_{name}", help_text, labels=labels)
            family.add_metric([self.backend.name], value)
            yield family


class StoreCollector(Collector):
    """Whether each store answered its last check (see ``store.health``)."""

    def __init__(self, health: StoreHealth) -> None:
        self.health = health

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily("tensafe_store_up", "1 when the store answered its last check",
                                   labels=("store",))
        for name, up in self.health.up.items():
            family.add_metric([name], 1.0 if up else 0.0)
        yield family
