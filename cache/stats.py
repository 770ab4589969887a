"""Counters the cache keeps for operators (exported to Prometheus by the gateway)."""
from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class Latencies:
    """Recent latencies (seconds) in a bounded window, plus running totals."""

    window: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=1024))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.window.append(seconds)
        self.count += 1
        self.total += seconds

    def quantile(self, q: float) -> float | None:
        if not self.window:
            return None
        ordered = sorted(self.window)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict:
        ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
        return {"count": self.count, "sum_s": round(self.total, 6), "p50_ms": ms(self.quantile(0.5)),
                "p95_ms": ms(self.quantile(0.95))}


@dataclasses.dataclass
class CacheCounters:
    cpu_hits: int = 0
    cpu_misses: int = 0
    device_hits: int = 0
    device_misses: int = 0
    fetches: int = 0  # disk -> CPU (verify + decrypt)
    fetch_failures: int = 0
    loads: int = 0  # CPU -> slot
    offloads: int = 0  # slot -> CPU (to make room or on request)
    cpu_evictions: int = 0
    fetch_latency: Latencies = dataclasses.field(default_factory=Latencies)
    load_latency: Latencies = dataclasses.field(default_factory=Latencies)

    def hit_rate(self, tier: str) -> float | None:
        hits, misses = getattr(self, f"{tier}_hits"), getattr(self, f"{tier}_misses")
        return None if hits + misses == 0 else hits / (hits + misses)
