"""What one gateway replica's ``/metrics`` says about each pool.

Reads the pinned names (``tensafe_ttft_seconds`` histogram, ``tensafe_queue_depth``,
``tensafe_running``, ``tensafe_backend_up``, ``tensafe_held_requests``,
``tensafe_pool_backends``, ``tensafe_backend_max_sequence_slots``) from Prometheus text with
prometheus_client's parser. The histogram is kept per series (its ``backend`` and ``tenant``
labels), so a series that goes (a backend that left) or restarts is told apart from a change
of the pool's totals.
"""
from __future__ import annotations

import dataclasses
import math

from prometheus_client.parser import text_string_to_metric_families

TTFT = "tensafe_ttft_seconds"


@dataclasses.dataclass
class PoolReading:
    """One replica's numbers for one pool at one moment."""

    #: (backend, tenant) -> le -> cumulative count
    buckets: dict[tuple[str, str], dict[float, float]] = dataclasses.field(default_factory=dict)
    count: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    queued: float = 0.0
    running: float = 0.0
    held: float = 0.0
    up: dict[str, bool] = dataclasses.field(default_factory=dict)  # backend -> up
    starting: float = 0.0
    slots: dict[str, float] = dataclasses.field(default_factory=dict)  # backend -> sequence slots

    @property
    def in_flight(self) -> float:
        return self.running + self.queued + self.held


def parse(text: str) -> dict[str, PoolReading]:
    """Every pool the text mentions (ValueError when it is not Prometheus exposition text)."""
    pools: dict[str, PoolReading] = {}
    slots: dict[str, float] = {}

    def pool(name: str) -> PoolReading:
        reading = pools.get(name)
        if reading is None:
            reading = pools[name] = PoolReading()
        return reading

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels, value = s.labels, s.value
            if math.isnan(value):
                continue
            if family.name == TTFT and "pool" in labels:
                r = pool(labels["pool"])
                series = (labels.get("backend", ""), labels.get("tenant", ""))
                if s.name == TTFT + "_bucket":
                    r.buckets.setdefault(series, {})[float(labels["le"])] = value
                elif s.name == TTFT + "_count":
                    r.count[series] = value
            elif family.name == "tensafe_queue_depth" and "pool" in labels:
                pool(labels["pool"]).queued += value
            elif family.name == "tensafe_running" and "pool" in labels:
                pool(labels["pool"]).running += value
            elif family.name == "tensafe_held_requests" and "pool" in labels:
                pool(labels["pool"]).held += value
            elif family.name == "tensafe_backend_up" and "pool" in labels:
                pool(labels["pool"]).up[labels.get("backend", "")] = value >= 1
            elif family.name == "tensafe_pool_backends" and labels.get("state") == "starting" and "pool" in labels:
                pool(labels["pool"]).starting += value
            elif family.name == "tensafe_backend_max_sequence_slots":
                slots[labels.get("backend", "")] = value
    for reading in pools.values():
        reading.slots = {b: slots[b] for b in reading.up if b in slots}
    return pools
