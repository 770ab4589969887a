"""Prometheus metrics at ``GET /metrics`` (an admin or ``metrics`` credential: tenants never see
each other's numbers). Request metrics are observed by the access-log middleware; cache, fleet
and store gauges are read at scrape time from their owners (no second bookkeeping). Each app
has its own registry, so several apps in one process do not collide.

Names the scaler, the alert rules and the dashboards depend on (pinned)::

    tensafe_ttft_seconds, tensafe_itl_seconds        histograms {pool, backend, tenant}
    tensafe_queue_depth, tensafe_running, tensafe_backend_up, tensafe_resident_adapters
                                                      gauges {pool, backend}
    tensafe_adapter_loads_total, tensafe_adapter_load_seconds   {pool, backend, tier}
    tensafe_dispatch_total                            {pool, reason}
    tensafe_tenant_service_tokens_total              {tenant}
    tensafe_queue_wait_seconds                        histogram {pool, tenant}
    tensafe_held_requests                             gauge {pool}: waiting while no backend is ready
    tensafe_pool_backends                             gauge {pool, state = ready|starting|down|drained}

``tenant`` takes the ``top_tenants`` tenants with the most requests and ``other`` for the rest
(a bounded label set, however many tenants there are). ITL is observed once per request: its
mean time between tokens. ``tensafe_held_requests`` has a sample for every configured pool,
0 included, whether or not it has backends (a pool scaled to zero is scaled up on it). A
backend that leaves the fleet takes its series with it (``forget_backend``): backends come and
go with autoscaling, and their names must not pile up.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from ..serving.fleet import Member
from ..store.health import StoreHealth

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_KNOWN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters", "/v1/route"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: TTFT and ITL buckets: SLO values (0.5 s, 1 s, 2 s, ...) fall on bucket edges
SLO_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0)
OTHER = "other"


class TopTenants:
    """Which tenants get a label of their own: the ``n`` with the most requests so far. A
    tenant that overtakes the least busy of them takes its place (the demoted one's series
    stop growing; its later requests count under ``other``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.counts: dict[str, int] = {}
        self.labelled: set[str] = set()

    def of(self, tenant: str) -> str:
        """The label ``tenant`` counts under now (without counting a request)."""
        return tenant if tenant in self.labelled or not tenant else OTHER

    def label(self, tenant: str) -> str:
        count = self.counts[tenant] = self.counts.get(tenant, 0) + 1
        if tenant in self.labelled:
            return tenant
        if len(self.labelled) < self.n:
            self.labelled.add(tenant)
            return tenant
        if self.n:
            weakest = min(self.labelled, key=self.counts.__getitem__)
            if count > 2 * self.counts[weakest]:
                self.labelled.discard(weakest)
                self.labelled.add(tenant)
                return tenant
        if len(self.counts) > 100 * max(1, self.n):  # forget the long tail now and then
            self.counts = {t: c for t, c in self.counts.items() if t in self.labelled or c > 1}
        return OTHER


class Metrics:
    def __init__(self, top_tenants: int = 20) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.top = TopTenants(top_tenants)
        self.fleet_ttft = Histogram("tensafe_ttft_seconds", "Time to first token", ("pool", "backend", "tenant"),
                                    buckets=SLO_BUCKETS, registry=self.registry)
        self.fleet_itl = Histogram("tensafe_itl_seconds", "Mean inter-token latency of a request",
                                   ("pool", "backend", "tenant"), buckets=SLO_BUCKETS, registry=self.registry)
        self.dispatches = Counter("tensafe_dispatch", "Requests dispatched to a backend, by why it was chosen",
                                  ("pool", "reason"), registry=self.registry)
        self.loads = Counter("tensafe_adapter_loads", "Adapter loads into a backend's slots, by the tier they came from",
                             ("pool", "backend", "tier"), registry=self.registry)
        self.service = Counter("tensafe_tenant_service_tokens", "Service a tenant received on the backends: "
                               "input tokens plus output tokens times fair_output_weight", ("tenant",),
                               registry=self.registry)
        self.queue_wait = Histogram("tensafe_queue_wait_seconds", "How long a request waited for a sequence slot",
                                    ("pool", "tenant"), buckets=SLO_BUCKETS, registry=self.registry)
        self.load_time = Histogram("tensafe_adapter_load_seconds", "Adapter load time, by the tier it came from",
                                   ("pool", "backend", "tier"), buckets=_LATENCY_BUCKETS, registry=self.registry)
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
        pool = record.get("pool")
        if pool is not None:
            self._child(self.dispatches, pool, record.get("dispatch") or "").inc()
        if "ttft_ms" in record:
            tenant = self.top.label(tenant) if tenant != "-" else tenant
            self._child(self.ttft, tenant).observe(record["ttft_ms"] / 1000)
            if pool is not None:
                labels = (pool, record.get("backend") or "", tenant)
                self._child(self.fleet_ttft, *labels).observe(record["ttft_ms"] / 1000)
                if "itl_ms" in record:
                    self._child(self.fleet_itl, *labels).observe(record["itl_ms"] / 1000)
        if "prompt_tokens" in record:
            self._child(self.tokens, tenant, "prompt").inc(record["prompt_tokens"])
            self._child(self.tokens, tenant, "completion").inc(record.get("completion_tokens", 0))

    def waited(self, pool: str, tenant: str, seconds: float) -> None:
        self._child(self.queue_wait, pool, self.top.label(tenant) if tenant else "-").observe(seconds)

    def served(self, tenant: str, tokens: float) -> None:
        self._child(self.service, self.top.of(tenant) or "-").inc(tokens)

    def adapter_loaded(self, pool: str, backend: str, tier: str, seconds: float) -> None:
        self._child(self.loads, pool, backend, tier).inc()
        self._child(self.load_time, pool, backend, tier).observe(seconds)

    def forget_backend(self, pool: str, backend: str) -> None:
        """Drop every series of ``backend`` (of ``pool``): it left the fleet."""
        per_backend = {id(m): m for m in (self.fleet_ttft, self.fleet_itl, self.loads, self.load_time)}
        for key in [k for k in self._children if k[0] in per_backend and k[1][:2] == (pool, backend)]:
            del self._children[key]
            try:
                per_backend[key[0]].remove(*key[1])
            except KeyError:
                pass

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


class FleetCollector(Collector):
    """Each backend's state, read at scrape time: the ``tensafe_backend_*`` gauges (label
    ``backend``) and the pinned fleet gauges (labels ``pool``, ``backend``); and ``held``, the
    requests each configured pool holds while none of its backends is ready (label ``pool``)."""

    def __init__(self, members: Callable[[], list[Member]],
                 held: Callable[[], Mapping[str, int]] | None = None,
                 starting: Callable[[], Mapping[str, int]] | None = None) -> None:
        """``starting``: per pool, the backends discovered that do not answer yet."""
        self.members = members
        self.held = held
        self.starting = starting

    def collect(self) -> Iterator[Any]:
        members = self.members()
        for name, field, help_text in (
            ("free_sequence_slots", "free_sequence_slots", "Free batch slots"),
            ("max_sequence_slots", "max_sequence_slots", "Batch slots"),
            ("queue_depth", "queue_depth", "Requests waiting for a batch slot"),
            ("free_adapter_slots", "free_adapter_slots", "Free adapter slots"),
            ("max_adapter_slots", "max_adapter_slots", "Adapter slots"),
        ):
            family = GaugeMetricFamily(f"tensafe_backend_{name}", help_text, labels=("backend",))
            for m in members:
                family.add_metric([m.name], getattr(m.backend.capacity(), field))
            yield family
        gauges = {
            "tensafe_queue_depth": ("Requests waiting for a sequence slot (the gateway's queue and the backend's)",
                                    lambda m: m.queue.waiting + m.backend.capacity().queue_depth),
            "tensafe_running": ("Requests holding a sequence slot", lambda m: m.queue.holders),
            "tensafe_backend_up": ("1 when the backend passes its health check and its breaker is not open",
                                   lambda m: 1.0 if m.up and m.breaker.state != "open" else 0.0),
            "tensafe_resident_adapters": ("Adapters in the backend's slots", lambda m: len(m.backend.adapters())),
        }
        for metric, (help_text, value) in gauges.items():
            family = GaugeMetricFamily(metric, help_text, labels=("pool", "backend"))
            for m in members:
                family.add_metric([m.pool, m.name], value(m))
            yield family
        held = self.held() if self.held is not None else {}
        starting = self.starting() if self.starting is not None else {}
        states = GaugeMetricFamily("tensafe_pool_backends", "A pool's backends by state: ready (in service), "
                                   "starting (discovered, not answering yet), down (failing its checks or "
                                   "breaker open) or drained (by an operator, or leaving)", labels=("pool", "state"))
        for pool in sorted({m.pool for m in members} | held.keys() | starting.keys()):
            mine = [m for m in members if m.pool == pool]
            ready = sum(1 for m in mine if m.ready() and m.breaker.state != "open")
            drained = sum(1 for m in mine if m.drained or m.leaving)
            states.add_metric([pool, "ready"], ready)
            states.add_metric([pool, "starting"], starting.get(pool, 0))
            states.add_metric([pool, "down"], len(mine) - ready - drained)
            states.add_metric([pool, "drained"], drained)
        yield states
        if self.held is not None:
            family = GaugeMetricFamily("tensafe_held_requests", "Requests waiting for a backend of the pool to be "
                                       "ready (none is: scaled to zero, starting, down or drained)", labels=("pool",))
            for pool, n in sorted(held.items()):
                family.add_metric([pool], n)
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
