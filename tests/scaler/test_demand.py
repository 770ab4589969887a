"""Each term of the demand the scaler reports, and the metadata it is configured by."""
from __future__ import annotations

import dataclasses
import math

import pytest

from scaler.demand import BadMetadata, PoolConfig, decide
from scaler.window import PoolState

CFG = PoolConfig(pool="cpu", slo_s=2.0, quantile=0.9, window_s=30, min_requests=20, occupancy=0.8, slots=8)
QUIET = PoolState(ttft_quantile_s=0.05, requests=300, throughput=10.0, in_flight=8, in_flight_mean=8,
                  running_mean=8, queued=0, held=0, backlog_growth=0.0, ready=2, ready_mean=2, ready_min=2,
                  starting=0, slots=8, idle_s=0.0)


def hpa(current: int, value: float, target: float) -> int:
    """What the HPA asks for with ``metricType: Value`` (tolerance 0.1)."""
    ratio = value / target
    return current if abs(ratio - 1) <= 0.1 else math.ceil(ratio * current)


def test_load_term_fills_slots_to_the_target_occupancy():
    d = decide(CFG, dataclasses.replace(QUIET, in_flight=30, in_flight_mean=26))
    assert (d.reason, d.need) == ("load", math.ceil(30 / (8 * 0.8)))
    assert hpa(2, d.value_ms, CFG.slo_ms) == d.need


def test_rate_term_uses_learned_capacity_and_a_growing_backlog():
    s = dataclasses.replace(QUIET, replica_rps=20.0, throughput=40.0, backlog_growth=8.0)
    d = decide(CFG, s)
    assert (d.reason, d.need) == ("rate", math.ceil(48 / (20 * 0.8)))
    draining = decide(CFG, dataclasses.replace(s, backlog_growth=-30.0))  # a draining backlog adds nothing
    assert draining.need == math.ceil(40 / 16)
    assert hpa(2, d.value_ms, CFG.slo_ms) == d.need


def test_ttft_term_is_the_latency_ratio_when_over_the_slo():
    s = dataclasses.replace(QUIET, ttft_quantile_s=5.0, replica_rps=20.0, throughput=30.0, backlog_growth=1.0)
    d = decide(CFG, s)
    assert d.reason == "ttft" and d.value_ms == 5000.0 and d.need == 5  # 2 replicas x 5 s / 2 s
    assert hpa(2, d.value_ms, CFG.slo_ms) == 5
    # too few requests measured: the queue decides instead
    assert decide(CFG, dataclasses.replace(s, requests=5)).reason == "rate"
    # a backlog being drained (after a start from zero) is not more demand
    assert decide(CFG, dataclasses.replace(s, backlog_growth=-5.0)).reason == "rate"
    # nor a window in which the pool had no replica at some point
    assert decide(CFG, dataclasses.replace(s, ready_min=0)).reason == "rate"


def test_near_the_slo_the_pool_is_not_shrunk():
    s = dataclasses.replace(QUIET, ttft_quantile_s=1.8, ready=4, ready_mean=4, ready_min=4, in_flight=4,
                            in_flight_mean=4)
    d = decide(CFG, s)
    assert (d.reason, d.need) == ("hold", 4)
    assert hpa(4, d.value_ms, CFG.slo_ms) == 4
    assert decide(CFG, dataclasses.replace(s, ttft_quantile_s=0.5)).need == 1  # far below: it may shrink


def test_replicas_starting_count_as_current():
    s = dataclasses.replace(QUIET, in_flight=40, in_flight_mean=40, ready=2, starting=3)
    d = decide(CFG, s)
    assert d.current == 5 and d.need == 7
    assert hpa(5, d.value_ms, CFG.slo_ms) == 7  # not 7 x 7 / 2


def test_start_from_zero_asks_for_one_replica_until_it_has_measured():
    s = dataclasses.replace(QUIET, ready=0, ready_mean=0, ready_min=0, starting=1, held=120, in_flight=120,
                            in_flight_mean=60, throughput=0.0, requests=0, ttft_quantile_s=None)
    d = decide(CFG, s)
    assert d.active and (d.reason, d.need) == ("start", 1)
    learned = decide(CFG, dataclasses.replace(s, replica_rps=10.0, backlog_growth=30.0))
    assert learned.need == math.ceil(30 / 8)  # held requests arriving at 30/s, 10/s a replica


def test_idle_is_inactive_with_a_zero_metric_and_the_cooldown_counts():
    idle = dataclasses.replace(QUIET, in_flight=0, in_flight_mean=0, idle_s=61.0)
    d = decide(CFG, idle)
    assert not d.active and d.value_ms == 0 and d.need == 0
    assert decide(CFG, dataclasses.replace(idle, idle_s=59.0)).active
    assert decide(CFG, dataclasses.replace(idle, idle_s=math.inf, held=1, in_flight=1)).active


def test_metadata():
    cfg = PoolConfig.from_metadata({"pool": "gpu-a", "ttftSLO": "1500ms", "quantile": "0.95", "window": "1m",
                                    "minRequests": "50", "activeCooldown": "120s", "targetOccupancy": "0.7"})
    assert (cfg.slo_s, cfg.quantile, cfg.window_s, cfg.min_requests, cfg.cooldown_s, cfg.occupancy) == \
        (1.5, 0.95, 60.0, 50, 120.0, 0.7)
    assert cfg.metric_name == "ttft-demand-gpu-a" and cfg.slo_ms == 1500
    assert PoolConfig.from_metadata({"pool": "cpu"}) == PoolConfig(pool="cpu")
    for bad in ({}, {"pool": "a b"}, {"pool": "p", "ttftSLO": "fast"}, {"pool": "p", "quantile": "1.5"},
                {"pool": "p", "minRequests": "x"}, {"pool": "p", "window": "0s"}):
        with pytest.raises(BadMetadata):
            PoolConfig.from_metadata(bad)
