"""Autoscaling on TTFT, simulated: the real scaler logic under a model of KEDA's and the HPA's loop.

A simulated fleet serves a load profile; its gateway replicas export the gateway's pinned
metrics (``tensafe_ttft_seconds``, ``tensafe_queue_depth``, ``tensafe_running``,
``tensafe_held_requests``, ``tensafe_pool_backends``, ...) through prometheus_client, and the
scaler's own code (``scaler.exposition.parse``, ``FleetWatch``, ``decide``) reads that text
every scrape round, exactly as ``tensafe-scaler`` does, and answers KEDA's questions.

The fleet: backends modelled on the dispatch benchmark's (8 sequence slots; a decode step takes
5 ms + 1 ms per running sequence; 32 tokens per request; the first token after one step), two
gateway replicas sending each request to the backend with the fewest requests per slot, holding
requests while the pool has no ready backend (up to 256 per replica and 60 s, then refused) and
seeing pods that are starting (``publishNotReadyAddresses``). A pod is ready ``startup_s``
after it is created; one removed takes no new requests and finishes what it holds.

KEDA and the HPA, with the settings the deploy overlays render: pollingInterval 15 s,
cooldownPeriod 300 s, min 0 / max 16 replicas; the HPA syncs every 15 s with tolerance 0.1,
scale-up stabilisation 0 s, scale-down stabilisation 300 s and its default rate policies (up:
the larger of +100% and +4 pods per 15 s; down: -100% per 15 s). Activation from zero: KEDA's
poll, or the scaler's StreamIsActive push after its next scrape round.

Load: idle 5 min, a ramp from 1x to 10x over 10 min, 20 min at 10x, 3x that for 2 min, then
idle (10 min, so scale-to-zero shows). The base rate is chosen so the spike needs 15 of the 16
replicas. Windows of 30 s with at least 20 requests count; a window meets the SLO when the p90
TTFT of the requests arriving in it is at most 2 s (a refused request counts as missing it).

The oracle: for every window, the fewest replicas that meet the SLO at its known rate, with
instant scaling (each replica count's highest rate found by simulating it in steady state).
The scalers compared, each through the same loop:

* ``ttft_scaler``: the scaler (``metricType: Value``, target the SLO);
* ``queue_depth``: vLLM production-stack's recipe: a Prometheus trigger on
  ``sum(vllm:num_requests_waiting)`` (the requests waiting for a backend's slots; the ones the
  gateway holds while there is none are counted too, so the recipe can scale from zero at all),
  ``metricType: AverageValue``, threshold 5, read without Prometheus's scrape delay;
* two floors, fed through the same loop: ``oracle_through_loop``, the oracle's replica count
  for the current rate, known exactly (the best a scaler that reacts can do: what the loop's
  delays, stabilisation and start-up cost it), and ``foresight_through_loop``, the count for the
  highest rate of the next start-up + sync + poll seconds (a scaler that knows the future).

One JSON line::

    {"ttft_scaler" | "queue_depth" | "oracle_through_loop": {"attainment",
     "replica_minutes_vs_oracle", "reversals", ...}, "startup_s": 25, "startup_120s": {...},
     "bars": ..., "meets_bars": ...}

    python -m loadtests.sim_autoscale [--seed 1] [--time-scale 1.0]

``--time-scale`` shrinks every duration of the profile and the loop alike (the test runs it
briefly).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import itertools
import json
import math
import random
import sys
from collections.abc import Callable

from scaler.demand import PoolConfig, decide, is_active
from scaler.exposition import parse
from scaler.window import FleetWatch

from .sim_fleet import (
    GATEWAYS,
    HOLD_TIMEOUT_S,
    MIN_REQUESTS,
    PER_SEQ_S,
    POOL,
    QUANTILE,
    SLO_S,
    SLOTS,
    STEP_S,
    TOKENS,
    WINDOW_S,
    Loop,
    Profile,
    Request,
    Sim,
)

__all__ = ["Loop", "Profile", "Sim", "Scaler", "TtftScaler", "QueueDepthScaler", "OracleThroughLoop", "Oracle",
           "main_run"]

# ---- KEDA and the HPA -----------------------------------------------------------------------
class Scaler:
    """KEDA's loop around one metric; subclasses say what the metric is."""

    metric_type = "Value"
    target = 1.0
    push = False  # activation pushed (StreamIsActive) as well as polled

    def attach(self, sim: Sim) -> None:
        self.sim = sim
        self.last_active = -math.inf
        self.recs: collections.deque[tuple[float, int]] = collections.deque()
        sim.at(0.0, "keda_poll", None)
        sim.at(0.0, "hpa_sync", None)
        sim.on_keda_poll = self.keda_poll  # type: ignore[attr-defined]
        sim.on_hpa_sync = self.hpa_sync  # type: ignore[attr-defined]

    def arrived(self, r: Request) -> None: ...

    def first_token(self, r: Request) -> None: ...

    def active(self) -> bool:
        raise NotImplementedError

    def value(self) -> float:
        raise NotImplementedError

    def activate(self) -> None:
        """KEDA's reaction to an active answer (polled or pushed)."""
        self.last_active = self.sim.now
        if self.sim.spec == 0:
            self.sim.set_spec(max(1, self.sim.loop.min_replicas))

    def keda_poll(self, _: object) -> None:
        sim, loop = self.sim, self.sim.loop
        if self.active():
            self.activate()
        elif sim.spec > 0 and sim.now - self.last_active >= loop.cooldown_s and loop.min_replicas == 0:
            sim.set_spec(0)
            self.recs.clear()
        sim.at(sim.now + loop.polling_s, "keda_poll", None)

    def hpa_sync(self, _: object) -> None:
        sim, loop = self.sim, self.sim.loop
        sim.at(sim.now + loop.sync_s, "hpa_sync", None)
        current = sim.spec
        if current == 0:
            return
        value = self.value()
        ratio = value / (self.target * current) if self.metric_type == "AverageValue" else value / self.target
        rec = current if abs(ratio - 1) <= loop.tolerance else math.ceil(ratio * current)
        rec = min(loop.max_replicas, max(1, rec))
        self.recs.append((sim.now, rec))
        while self.recs and self.recs[0][0] < sim.now - max(loop.down_window_s, loop.up_window_s):
            self.recs.popleft()
        up = min(r for t, r in self.recs if t >= sim.now - loop.up_window_s)
        down = max(r for t, r in self.recs if t >= sim.now - loop.down_window_s)
        desired = up if current < up else down if current > down else current
        if desired > current:
            desired = min(desired, max(2 * current, current + 4))
        sim.set_spec(min(loop.max_replicas, desired))


class TtftScaler(Scaler):
    """The scaler: the gateways' exposition text, parsed and windowed by the scaler's code."""

    push = True

    def __init__(self, k: float = 1.0) -> None:
        self.cfg = PoolConfig(pool=POOL, slo_s=SLO_S, quantile=QUANTILE, window_s=WINDOW_S * k,
                              min_requests=MIN_REQUESTS, cooldown_s=60 * k)
        self.target = self.cfg.slo_ms
        self.watch = FleetWatch(window_s=self.cfg.window_s)

    def attach(self, sim: Sim) -> None:
        super().attach(sim)
        sim.on_scrape = self.scrape  # type: ignore[attr-defined]
        sim.at(0.0, "scrape", None)

    def first_token(self, r: Request) -> None:
        assert r.backend is not None
        self.sim.registries[r.gateway][1].labels(POOL, r.backend.name, "t").observe(r.first - r.arrival)

    def scrape(self, _: object) -> None:
        sim = self.sim
        for g in range(GATEWAYS):
            self.watch.observe(f"g{g}", sim.now, parse(sim.exposition(g)))
        if sim.spec == 0 and self.active():  # StreamIsActive pushes after the round
            self.activate()
        sim.at(sim.now + (sim.loop.scrape_s if sim.spec == 0 else sim.loop.busy_scrape_s), "scrape", None)

    def state(self):  # noqa: ANN201 - the scaler's PoolState
        return self.watch.state(POOL, self.sim.now, QUANTILE, self.cfg.window_s)

    def active(self) -> bool:
        return is_active(self.cfg, self.state())

    def value(self) -> float:
        return decide(self.cfg, self.state()).value_ms


class QueueDepthScaler(Scaler):
    """vLLM production-stack's recipe: ``sum(vllm:num_requests_waiting)``, AverageValue 5."""

    metric_type = "AverageValue"
    target = 5.0

    def waiting(self) -> float:
        return sum(len(b.queue) for b in self.sim.backends) + sum(len(h) for h in self.sim.held)

    def active(self) -> bool:
        return self.waiting() > 0

    def value(self) -> float:
        return self.waiting()


class OracleThroughLoop(Scaler):
    """The oracle's replica count for the rate now (``lead_s`` 0) or for the highest rate of the
    next ``lead_s`` seconds, known exactly, through the same loop (floors)."""

    push = True

    def __init__(self, profile: Profile, needed: Callable[[float], int], lead_s: float = 0.0) -> None:
        self.profile, self.needed, self.lead_s = profile, needed, lead_s
        self.target = SLO_S * 1000

    def rate(self) -> float:
        now = self.sim.now
        return max(self.profile.rate(now + self.lead_s * i / 10) for i in range(11))

    def attach(self, sim: Sim) -> None:
        super().attach(sim)
        sim.on_watch = self.watch  # type: ignore[attr-defined]
        sim.at(0.0, "watch", None)

    def watch(self, _: object) -> None:
        if self.sim.spec == 0 and self.active():
            self.activate()
        self.sim.at(self.sim.now + self.sim.loop.scrape_s, "watch", None)

    def active(self) -> bool:
        return self.rate() > 0 or any(self.sim.held) or any(b.running or b.queue for b in self.sim.backends)

    def value(self) -> float:
        need = max(1, self.needed(self.rate()))
        return self.target * (need - 0.001) / self.sim.spec


# ---- the oracle ------------------------------------------------------------------------------
def p90(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(QUANTILE * len(ordered)) - 1)]


def ttft_of(r: Request) -> float:
    return math.inf if r.refused or r.first is None else r.first - r.arrival


def meets_slo(replicas: int, rate: float, seconds: float, seed: int) -> bool:
    """Whether ``replicas`` backends in steady state keep p90 TTFT within the SLO at ``rate``."""
    rng = random.Random(seed)
    warm = 20.0
    arrivals = Profile([(warm + seconds, rate, rate)]).arrivals(rng)
    sim = Sim(arrivals, Loop(), None, fixed=replicas, seed=seed, end=warm + seconds + 30)
    sim.run()
    measured = [ttft_of(r) for r in sim.done if r.arrival >= warm]
    measured += [math.inf for b in sim.backends for r in (*b.running, *b.queue) if r.arrival >= warm and r.first is None]
    return p90(measured) <= SLO_S


class Oracle:
    """The fewest replicas that meet the SLO at a rate (each count's highest rate, by bisection
    over steady-state simulations, computed once per run)."""

    def __init__(self, max_replicas: int, seconds: float = 60.0, seed: int = 7) -> None:
        self.limits: list[float] = []
        per_backend = SLOTS / (TOKENS * (STEP_S + PER_SEQ_S * SLOTS))  # full-batch throughput
        for k in range(1, max_replicas + 1):
            lo, hi = 0.5 * k * per_backend, k * per_backend  # no more than it completes at full batches
            for _ in range(7):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if meets_slo(k, mid, seconds, seed + k) else (lo, mid)
            self.limits.append(lo)

    def needed(self, rate: float) -> int:
        if rate <= 0:
            return 0
        return min(len(self.limits), bisect.bisect_left(self.limits, rate) + 1)


# ---- one comparison --------------------------------------------------------------------------
def evaluate(sim: Sim, profile: Profile, oracle: Oracle, window_s: float) -> dict:
    windows: dict[int, list[float]] = collections.defaultdict(list)
    for r in sim.done:
        windows[int(r.arrival // window_s)].append(ttft_of(r))
    for b in sim.backends:
        for r in (*b.running, *b.queue):
            windows[int(r.arrival // window_s)].append(ttft_of(r))
    for held in sim.held:
        for r in held:
            windows[int(r.arrival // window_s)].append(math.inf)
    counted = [w for w, v in windows.items() if len(v) >= MIN_REQUESTS]
    met = [w for w in counted if p90(windows[w]) <= SLO_S]
    n_windows = math.ceil(profile.duration / window_s)
    oracle_minutes = sum(oracle.needed(profile.mean_rate(w * window_s, (w + 1) * window_s))
                         for w in range(n_windows)) * window_s / 60
    specs = [n for _, n in sim.spec_log]
    moves = [b - a for a, b in itertools.pairwise(specs) if b != a]
    reversals = sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))
    refused = sum(1 for r in sim.done if r.refused)
    return {"attainment": round(len(met) / max(1, len(counted)), 3), "windows": len(counted),
            "replica_minutes": round(sim.replica_minutes(), 1), "oracle_replica_minutes": round(oracle_minutes, 1),
            "replica_minutes_vs_oracle": round(sim.replica_minutes() / max(1e-9, oracle_minutes), 3),
            "reversals": reversals, "peak_replicas": max(specs), "final_replicas": specs[-1], "refused": refused}


def compare(startup_s: float, seed: int, k: float, oracle: Oracle, base_rps: float) -> dict:
    loop = dataclasses.replace(Loop(), startup_s=startup_s).scaled(k)
    profile = Profile.standard(base_rps, k)
    arrivals = profile.arrivals(random.Random(seed))
    lead = loop.startup_s + loop.sync_s + loop.polling_s
    out = {}
    for name, make in (("ttft_scaler", lambda: TtftScaler(k)), ("queue_depth", QueueDepthScaler),
                       ("oracle_through_loop", lambda: OracleThroughLoop(profile, oracle.needed)),
                       ("foresight_through_loop", lambda: OracleThroughLoop(profile, oracle.needed, lead))):
        print(f"startup {startup_s:.0f} s: {name} ...", file=sys.stderr)
        sim = Sim(arrivals, loop, make(), seed=seed, end=profile.duration, hold_timeout_s=HOLD_TIMEOUT_S * k)
        sim.run()
        out[name] = evaluate(sim, profile, oracle, WINDOW_S * k)
    return out


def meets(r: dict) -> bool:
    ours, peer = r["ttft_scaler"], r["queue_depth"]
    return (ours["attainment"] >= 0.95 and ours["replica_minutes_vs_oracle"] <= 1.25
            and ours["attainment"] > peer["attainment"]
            and ours["replica_minutes_vs_oracle"] <= peer["replica_minutes_vs_oracle"]
            and ours["reversals"] <= peer["reversals"])


def main_run(seed: int = 1, k: float = 1.0, max_replicas: int = 16, oracle_s: float = 60.0,
             startups: tuple[float, ...] = (25.0, 120.0)) -> dict:
    oracle = Oracle(max_replicas, seconds=oracle_s)
    base_rps = oracle.limits[min(len(oracle.limits), 15) - 1] / 30 * 0.97  # the spike needs 15 replicas
    result: dict = {"bench": "sim_autoscale", "seed": seed, "time_scale": k, "base_rps": round(base_rps, 2),
                    "oracle_rps_per_replicas": [round(x, 1) for x in oracle.limits]}
    result.update(compare(startups[0], seed, k, oracle, base_rps))
    result["startup_s"] = startups[0]
    result["meets_bars"] = {f"startup_{startups[0]:.0f}s": meets(result)}
    for startup in startups[1:]:
        result[f"startup_{startup:.0f}s"] = compare(startup, seed, k, oracle, base_rps)
        result["meets_bars"][f"startup_{startup:.0f}s"] = meets(result[f"startup_{startup:.0f}s"])
    result["bars"] = {"attainment": 0.95, "replica_minutes_vs_oracle": 1.25,
                      "vs_queue_depth": "higher attainment, no more replica-minutes, no more reversals"}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-scale", type=float, default=1.0, help="shrink every duration by this factor")
    args = ap.parse_args()
    print(json.dumps(main_run(args.seed, args.time_scale)))


if __name__ == "__main__":
    main()
