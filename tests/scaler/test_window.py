"""The scaler's reading of gateway metrics: exposition text made by prometheus_client (as the
gateway makes it), histograms merged over replicas and windows, restarts and departed series."""
from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from gateway.api.metrics import SLO_BUCKETS
from scaler.exposition import parse
from scaler.window import FleetWatch, quantile_of


class Replica:
    """One gateway replica's pinned metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram("tensafe_ttft_seconds", "", ("pool", "backend", "tenant"), buckets=SLO_BUCKETS,
                              registry=self.registry)
        self.queue = Gauge("tensafe_queue_depth", "", ("pool", "backend"), registry=self.registry)
        self.running = Gauge("tensafe_running", "", ("pool", "backend"), registry=self.registry)
        self.up = Gauge("tensafe_backend_up", "", ("pool", "backend"), registry=self.registry)
        self.held = Gauge("tensafe_held_requests", "", ("pool",), registry=self.registry)
        self.slots = Gauge("tensafe_backend_max_sequence_slots", "", ("backend",), registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def test_parse_sums_queue_and_keeps_histogram_series_apart():
    r = Replica()
    r.ttft.labels("cpu", "b0", "t1").observe(0.3)
    r.ttft.labels("cpu", "b1", "t2").observe(3.5)
    r.ttft.labels("gpu", "g0", "t1").observe(0.01)
    r.queue.labels("cpu", "b0").set(3)
    r.queue.labels("cpu", "b1").set(4)
    r.running.labels("cpu", "b0").set(8)
    r.up.labels("cpu", "b0").set(1)
    r.up.labels("cpu", "b1").set(0)
    r.held.labels("cpu").set(2)
    r.slots.labels("b0").set(8)
    pools = parse(r.text())
    cpu = pools["cpu"]
    assert set(pools) == {"cpu", "gpu"}
    assert cpu.queued == 7 and cpu.running == 8 and cpu.held == 2 and cpu.in_flight == 17
    assert cpu.up == {"b0": True, "b1": False} and cpu.slots == {"b0": 8}
    assert cpu.count == {("b0", "t1"): 1, ("b1", "t2"): 1}
    assert cpu.buckets[("b0", "t1")][0.5] == 1 and cpu.buckets[("b0", "t1")][0.25] == 0
    assert cpu.buckets[("b1", "t2")][math.inf] == 1


def test_parse_refuses_what_is_not_exposition_text():
    with pytest.raises(ValueError):
        parse("this is { not prometheus")


def test_two_replicas_histograms_merge_over_the_window():
    a, b = Replica(), Replica()
    watch = FleetWatch(window_s=30)
    for r in (a, b):
        r.up.labels("cpu", "b0").set(1)
    watch.observe("a", 0.0, parse(a.text()))
    watch.observe("b", 0.0, parse(b.text()))
    for _ in range(90):
        a.ttft.labels("cpu", "b0", "t").observe(0.1)  # fast on a
    for _ in range(10):
        b.ttft.labels("cpu", "b0", "t").observe(4.0)  # slow on b
    watch.observe("a", 10.0, parse(a.text()))
    watch.observe("b", 10.0, parse(b.text()))
    s = watch.state("cpu", 10.0, 0.9)
    assert s.requests == 100
    assert s.throughput == pytest.approx(10.0)
    assert 0.05 < s.ttft_quantile_s <= 0.1  # the 90th of 100 is still a fast one
    assert watch.state("cpu", 10.0, 0.95).ttft_quantile_s > 3.0  # the 95th is one of b's
    # 40 s later nothing new happened: the window no longer holds those requests
    watch.observe("a", 50.0, parse(a.text()))
    watch.observe("b", 50.0, parse(b.text()))
    later = watch.state("cpu", 50.0, 0.9)
    assert later.requests == 0 and later.ttft_quantile_s is None
    assert later.ready == 1


def test_a_restarted_replica_and_a_departed_backend_are_not_negative_traffic():
    r = Replica()
    watch = FleetWatch(window_s=30)
    r.ttft.labels("cpu", "b0", "t").observe(0.2)
    r.ttft.labels("cpu", "b1", "t").observe(0.2)
    watch.observe("r", 0.0, parse(r.text()))
    r.ttft.remove("cpu", "b1", "t")  # b1 left: its series is gone
    r.ttft.labels("cpu", "b0", "t").observe(0.2)
    watch.observe("r", 5.0, parse(r.text()))
    assert watch.state("cpu", 5.0, 0.9).requests == 1
    fresh = Replica()  # the replica restarted: its counters begin again at zero
    fresh.ttft.labels("cpu", "b0", "t").observe(0.2)
    watch.observe("r", 10.0, parse(fresh.text()))
    assert watch.state("cpu", 10.0, 0.9).requests == 2
    fresh.ttft.labels("cpu", "b2", "t").observe(0.2)  # a new series: all of it is new traffic
    watch.observe("r", 12.0, parse(fresh.text()))
    assert watch.state("cpu", 12.0, 0.9).requests == 3


def test_a_replica_that_stops_answering_is_forgotten():
    r = Replica()
    r.running.labels("cpu", "b0").set(5)
    watch = FleetWatch(window_s=30, forget_s=60)
    watch.observe("r", 0.0, parse(r.text()))
    assert watch.state("cpu", 1.0, 0.9).in_flight == 5
    assert watch.state("cpu", 61.0, 0.9).in_flight == 0


def test_quantile_interpolates_like_histogram_quantile():
    buckets = {0.5: 0.0, 1.0: 10.0, 2.0: 20.0, math.inf: 20.0}
    assert quantile_of(buckets, 0.5) == pytest.approx(1.0)
    assert quantile_of(buckets, 0.75) == pytest.approx(1.5)
    assert quantile_of({1.0: 0.0, math.inf: 4.0}, 0.9) == 1.0  # in +Inf: the largest finite bound
    assert quantile_of({1.0: 0.0, math.inf: 0.0}, 0.9) is None


def test_capacity_is_learned_only_when_the_pool_runs_saturated():
    r = Replica()
    watch = FleetWatch(window_s=30)
    for b in ("b0", "b1"):
        r.up.labels("cpu", b).set(1)
        r.slots.labels(b).set(8)
        r.running.labels("cpu", b).set(3)
    watch.observe("r", 0.0, parse(r.text()))
    for _ in range(300):
        r.ttft.labels("cpu", "b0", "t").observe(0.02)
    watch.observe("r", 30.0, parse(r.text()))
    assert watch.state("cpu", 30.0, 0.9).replica_rps is None  # 3 of 8 slots busy: not saturated
    for b in ("b0", "b1"):
        r.running.labels("cpu", b).set(8)
        r.queue.labels("cpu", b).set(5)
    watch.observe("r", 40.0, parse(r.text()))
    for _ in range(400):
        r.ttft.labels("cpu", "b0", "t").observe(0.5)
    watch.observe("r", 70.0, parse(r.text()))
    s = watch.state("cpu", 70.0, 0.9)
    assert s.replica_rps == pytest.approx(400 / 30 / 2)  # 400 first tokens in 30 s on 2 replicas
