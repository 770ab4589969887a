"""A pool's demand, from what the gateways measured, as the metric KEDA's HPA compares with the SLO.

The ScaledObject uses ``metricType: Value`` with target = the TTFT SLO in milliseconds, so the
HPA asks for ``ceil(current × value / SLO)`` replicas. The scaler works out how many replicas
the pool needs, ``need``, and answers ``value = SLO × need / current`` (a hair below, so the
ceiling lands on ``need``). ``need`` is the larger of:

* **load**: the requests in flight (running + queued + held), averaged over the window (the
  latest scrape when it is higher: a queue that grows is acted on at once), over the sequence
  slots of a replica times ``targetOccupancy``: what keeps the queue short;
* **ttft**, only when the window measured at least ``minRequests`` first tokens: the measured
  quantile over the SLO, times the replicas there are, when it is above the SLO (the plain
  latency ratio); near the SLO (above ``holdBand`` × SLO) it holds the replicas there are, so
  a pool at its SLO is never shrunk on the strength of the load term alone.

When the window measured too few requests, the load term (queue depth) is all there is. When
the ttft term is the larger, ``value`` is the measured quantile itself. ``current`` is the
backends ready plus those starting (the gateways see a pool's addresses before they answer),
so replicas already on their way are not asked for twice; at zero KEDA activates one replica
first (``IsActive``), and the answer is computed for that one.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

from .window import PoolState

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


class BadMetadata(ValueError):
    """scalerMetadata that cannot be used (the gRPC status is INVALID_ARGUMENT)."""


def duration_s(text: str, what: str) -> float:
    m = _DURATION.match(text)
    if m is None:
        raise BadMetadata(f"{what}: {text!r} is not a duration such as 2s, 500ms or 1m")
    value = float(m.group(1))
    return value / 1000 if m.group(2) == "ms" else value * 60 if m.group(2) == "m" else value


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """One ScaledObject's ``scalerMetadata``."""

    pool: str
    slo_s: float = 2.0  # ttftSLO
    quantile: float = 0.9  # quantile
    window_s: float = 30.0  # window
    min_requests: int = 20  # minRequests
    cooldown_s: float = 60.0  # activeCooldown: active this long after the last request
    occupancy: float = 0.8  # targetOccupancy: share of a replica's capacity (or slots) to use
    hold_band: float = 0.8  # holdBand: share of the SLO above which replicas are never removed
    slots: float = 8.0  # sequenceSlots: a replica's slots when the gateways report none

    @property
    def metric_name(self) -> str:
        return f"ttft-demand-{self.pool}"

    @property
    def slo_ms(self) -> float:
        return self.slo_s * 1000

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "PoolConfig":
        pool = meta.get("pool", "").strip()
        if not pool or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", pool):
            raise BadMetadata("pool: name the backend pool (letters, digits, . _ -)")
        try:
            cfg = cls(
                pool=pool,
                slo_s=duration_s(meta.get("ttftSLO", "2s"), "ttftSLO"),
                quantile=float(meta.get("quantile", "0.9")),
                window_s=duration_s(meta.get("window", "30s"), "window"),
                min_requests=int(meta.get("minRequests", "20")),
                cooldown_s=duration_s(meta.get("activeCooldown", "60s"), "activeCooldown"),
                occupancy=float(meta.get("targetOccupancy", "0.8")),
                hold_band=float(meta.get("holdBand", "0.8")),
                slots=float(meta.get("sequenceSlots", "8")))
        except ValueError as exc:
            raise BadMetadata(str(exc)) from None
        if not (0 < cfg.quantile < 1 and 0 < cfg.occupancy <= 1 and 0 < cfg.hold_band <= 1):
            raise BadMetadata("quantile and holdBand must be in (0, 1), targetOccupancy in (0, 1]")
        if cfg.slo_s <= 0 or cfg.window_s <= 0 or cfg.min_requests < 0 or cfg.slots <= 0:
            raise BadMetadata("ttftSLO, window and sequenceSlots must be positive, minRequests not negative")
        return cfg


@dataclasses.dataclass(frozen=True)
class Decision:
    value_ms: float  # the metric
    need: int  # replicas the pool needs
    current: int  # replicas the answer is computed against
    reason: str  # load | ttft | hold | idle
    active: bool
    ttft_quantile_s: float | None
    requests: float


def is_active(cfg: PoolConfig, s: PoolState) -> bool:
    """Traffic within the cooldown, or anything queued, running or held."""
    return s.in_flight > 0 or s.idle_s <= cfg.cooldown_s


def decide(cfg: PoolConfig, s: PoolState) -> Decision:
    active = is_active(cfg, s)
    current = s.ready + s.starting
    if not active:
        return Decision(0.0, 0, current, "idle", False, s.ttft_quantile_s, s.requests)
    if s.replica_rps:  # a replica's capacity is known: the arrival rate over it
        arrivals = s.throughput + max(0.0, s.backlog_growth)
        need, reason = arrivals / (s.replica_rps * cfg.occupancy), "rate"
    elif s.ready_min == 0:  # started from zero within the window: one replica first, then measure
        need, reason = 1.0, "start"
    else:  # the requests in flight over the slots
        need, reason = max(s.in_flight_mean, s.in_flight) / ((s.slots or cfg.slots) * cfg.occupancy), "load"
    measured = s.requests >= cfg.min_requests and s.ttft_quantile_s is not None
    # TTFT over a window with replicas throughout, and a backlog that is not draining (a start
    # from zero leaves slow first tokens behind that the replicas there are already clear)
    if measured and s.ready_min > 0 and current and s.backlog_growth >= 0:
        ratio = s.ttft_quantile_s / cfg.slo_s  # type: ignore[operator]
        if ratio > 1 and current * ratio > need:
            need, reason = current * ratio, "ttft"
        elif ratio > cfg.hold_band and current > need:
            need, reason = current, "hold"
    wanted = max(1, math.ceil(need - 1e-9))
    if reason == "ttft":
        value = s.ttft_quantile_s * 1000  # type: ignore[operator]
    else:
        value = cfg.slo_ms * (wanted - 0.001) / max(1, current)
    return Decision(value, wanted, current, reason, True, s.ttft_quantile_s, s.requests)
