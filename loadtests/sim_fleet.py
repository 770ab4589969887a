"""The simulated fleet behind ``sim_autoscale``: backends, gateway replicas and the metrics
they export, the load profile and KEDA's and the HPA's settings (see that module's docstring).

Backends are modelled on the dispatch benchmark's: 8 sequence slots; a decode step takes
5 ms + 1 ms per running sequence; 32 tokens per request, the first after one step. Two gateway
replicas send each request to the backend with the fewest requests per slot and hold requests
while the pool has no ready backend (up to 256 per replica and 60 s, then refused); they export
the gateway's pinned metrics through prometheus_client, pods still starting included.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.api.metrics import SLO_BUCKETS

if TYPE_CHECKING:
    from .sim_autoscale import Scaler

POOL = "cpu"
SLOTS, STEP_S, PER_SEQ_S, TOKENS = 8, 0.005, 0.001, 32
GATEWAYS = 2
HOLD_MAX, HOLD_TIMEOUT_S = 256, 60.0
SLO_S, QUANTILE, WINDOW_S, MIN_REQUESTS = 2.0, 0.9, 30.0, 20


@dataclasses.dataclass(frozen=True)
class Loop:
    """KEDA's and the HPA's settings (seconds)."""

    polling_s: float = 15.0
    cooldown_s: float = 300.0
    sync_s: float = 15.0
    tolerance: float = 0.1
    up_window_s: float = 0.0
    down_window_s: float = 300.0
    min_replicas: int = 0
    max_replicas: int = 16
    startup_s: float = 25.0
    scrape_s: float = 1.0  # the scaler's scrape round while the pool is at zero (activation)
    busy_scrape_s: float = 3.0  # and while it has replicas (the HPA reads every 15 s)

    def scaled(self, k: float) -> "Loop":
        return dataclasses.replace(self, polling_s=self.polling_s * k, cooldown_s=self.cooldown_s * k,
                                   sync_s=self.sync_s * k, up_window_s=self.up_window_s * k,
                                   down_window_s=self.down_window_s * k, startup_s=self.startup_s * k,
                                   scrape_s=min(self.scrape_s, max(0.25, self.scrape_s * k)),
                                   busy_scrape_s=min(self.busy_scrape_s, max(0.25, self.busy_scrape_s * k)))


@dataclasses.dataclass
class Profile:
    """Segments of (seconds, rate at start, rate at end) in requests per second."""

    segments: list[tuple[float, float, float]]

    @classmethod
    def standard(cls, base_rps: float, k: float = 1.0) -> "Profile":
        return cls([(300 * k, 0.0, 0.0), (600 * k, base_rps, 10 * base_rps), (1200 * k, 10 * base_rps, 10 * base_rps),
                    (120 * k, 30 * base_rps, 30 * base_rps), (600 * k, 0.0, 0.0)])

    @property
    def duration(self) -> float:
        return sum(s[0] for s in self.segments)

    def rate(self, t: float) -> float:
        start = 0.0
        for length, a, b in self.segments:
            if t < start + length:
                return a + (b - a) * (t - start) / length
            start += length
        return 0.0

    def mean_rate(self, t0: float, t1: float, n: int = 30) -> float:
        return sum(self.rate(t0 + (t1 - t0) * (i + 0.5) / n) for i in range(n)) / n

    def arrivals(self, rng: random.Random) -> list[float]:
        """A non-homogeneous Poisson stream (thinning, segment by segment)."""
        out: list[float] = []
        start = 0.0
        for length, a, b in self.segments:
            peak = max(a, b)
            t = start
            while peak > 0:
                t += rng.expovariate(peak)
                if t >= start + length:
                    break
                if rng.random() * peak <= self.rate(t):
                    out.append(t)
            start += length
        return out


# ---- the fleet -------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Request:
    arrival: float
    gateway: int
    first: float | None = None
    left: int = TOKENS
    refused: bool = False
    backend: "Backend | None" = None


@dataclasses.dataclass(eq=False)
class Backend:
    name: str
    created: float
    ready_at: float
    running: list[Request] = dataclasses.field(default_factory=list)
    queue: collections.deque[Request] = dataclasses.field(default_factory=collections.deque)
    stepping: bool = False
    leaving: bool = False
    gone_at: float | None = None

    def ready(self, now: float) -> bool:
        return now >= self.ready_at and not self.leaving

    def load(self) -> float:
        return (len(self.running) + len(self.queue)) / SLOTS


class Sim:
    """One run of the fleet under a scaler (``scaler`` None: a fixed fleet of ``fixed`` backends)."""

    def __init__(self, arrivals: list[float], loop: Loop, scaler: "Scaler | None", *, fixed: int = 0,
                 seed: int = 1, end: float | None = None, hold_timeout_s: float = HOLD_TIMEOUT_S) -> None:
        self.loop, self.scaler = loop, scaler
        self.hold_timeout_s = hold_timeout_s
        self.rng = random.Random(seed)
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.backends: list[Backend] = []
        self.names = itertools.count()
        self.held: list[collections.deque[Request]] = [collections.deque() for _ in range(GATEWAYS)]
        self.done: list[Request] = []
        self.spec = 0
        self.spec_log: list[tuple[float, int]] = [(0.0, 0)]
        self.end = end if end is not None else (arrivals[-1] + 120 if arrivals else 0.0)
        for t in arrivals:
            self.at(t, "arrive", None)
        if scaler is None:
            self.set_spec(fixed, ready_now=True)
        else:
            self.registries = [self._registry(g) for g in range(GATEWAYS)]
            scaler.attach(self)

    # ---- events
    def at(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def run(self) -> None:
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > self.end:
                break
            self.now = t
            getattr(self, "on_" + kind)(payload)
        self.now = self.end

    def on_arrive(self, _: object) -> None:
        r = Request(self.now, self.rng.randrange(GATEWAYS))
        if not self.dispatch(r):
            if len(self.held[r.gateway]) >= HOLD_MAX:
                self.refuse(r)
            else:
                self.held[r.gateway].append(r)
                self.at(self.now + self.hold_timeout_s, "hold_timeout", r)
        if self.scaler is not None:
            self.scaler.arrived(r)

    def dispatch(self, r: Request) -> bool:
        ready = [b for b in self.backends if b.ready(self.now)]
        if not ready:
            return False
        b = min(ready, key=Backend.load)
        r.backend = b
        b.queue.append(r)
        if not b.stepping:
            self.admit(b)
            self.step(b)
        return True

    def refuse(self, r: Request) -> None:
        r.refused = True
        self.done.append(r)

    def on_hold_timeout(self, r: Request) -> None:
        held = self.held[r.gateway]
        if r.backend is None and not r.refused and r in held:
            held.remove(r)
            self.refuse(r)

    def admit(self, b: Backend) -> None:
        while b.queue and len(b.running) < SLOTS:
            b.running.append(b.queue.popleft())

    def step(self, b: Backend) -> None:
        if b.running:
            b.stepping = True
            self.at(self.now + STEP_S + PER_SEQ_S * len(b.running), "stepped", b)
        else:
            b.stepping = False
            if b.leaving and b.gone_at is None:
                self.gone(b)

    def on_stepped(self, b: Backend) -> None:
        still = []
        for r in b.running:
            if r.first is None:
                r.first = self.now
                if self.scaler is not None:
                    self.scaler.first_token(r)
            r.left -= 1
            if r.left > 0:
                still.append(r)
            else:
                self.done.append(r)
        b.running = still
        self.admit(b)
        self.step(b)

    def on_ready(self, b: Backend) -> None:
        if b.leaving:
            return
        for held in self.held:
            while held:
                r = held.popleft()
                self.dispatch(r)

    # ---- replicas
    def set_spec(self, n: int, ready_now: bool = False) -> None:
        n = max(0, n)
        live = [b for b in self.backends if not b.leaving]
        if n > len(live):
            for _ in range(n - len(live)):
                ready_at = self.now if ready_now else self.now + self.loop.startup_s
                b = Backend(f"b{next(self.names)}", self.now, ready_at)
                self.backends.append(b)
                self.at(ready_at, "ready", b)
        elif n < len(live):
            # a ReplicaSet removes pods not ready first, then the newest
            victims = sorted(live, key=lambda b: (b.ready(self.now), -b.created))[:len(live) - n]
            for b in victims:
                b.leaving = True
                waiting = list(b.queue)
                b.queue.clear()
                if not b.running:
                    self.gone(b)
                for r in waiting:
                    r.backend = None
                    if not self.dispatch(r):
                        self.held[r.gateway].append(r)
        if n != self.spec:
            self.spec = n
            self.spec_log.append((self.now, n))

    def gone(self, b: Backend) -> None:
        """``b`` has finished and left: the gateways drop its series."""
        b.gone_at = self.now
        if self.scaler is not None:
            for _, ttft in self.registries:
                try:
                    ttft.remove(POOL, b.name, "t")
                except KeyError:
                    pass

    def pods(self) -> int:
        return sum(1 for b in self.backends if b.gone_at is None)

    # ---- what the gateways export
    def _registry(self, gateway: int) -> tuple[CollectorRegistry, Histogram]:
        registry = CollectorRegistry(auto_describe=False)
        ttft = Histogram("tensafe_ttft_seconds", "Time to first token", ("pool", "backend", "tenant"),
                         buckets=SLO_BUCKETS, registry=registry)
        registry.register(_GatewayGauges(self, gateway))
        return registry, ttft

    def exposition(self, gateway: int) -> str:
        return generate_latest(self.registries[gateway][0]).decode()

    # ---- results
    def replica_minutes(self) -> float:
        total = 0.0
        for b in self.backends:
            end = b.gone_at if b.gone_at is not None else self.end
            total += max(0.0, min(end, self.end) - b.created)
        return total / 60


class _GatewayGauges(Collector):
    def __init__(self, sim: Sim, gateway: int) -> None:
        self.sim, self.gateway = sim, gateway

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sim, g = self.sim, self.gateway
        members = [b for b in sim.backends if b.ready(sim.now) or (b.leaving and b.gone_at is None)]
        queue = GaugeMetricFamily("tensafe_queue_depth", "", labels=("pool", "backend"))
        running = GaugeMetricFamily("tensafe_running", "", labels=("pool", "backend"))
        up = GaugeMetricFamily("tensafe_backend_up", "", labels=("pool", "backend"))
        slots = GaugeMetricFamily("tensafe_backend_max_sequence_slots", "", labels=("backend",))
        for b in members:
            queue.add_metric([POOL, b.name], sum(1 for r in b.queue if r.gateway == g))
            running.add_metric([POOL, b.name], sum(1 for r in b.running if r.gateway == g))
            up.add_metric([POOL, b.name], 0.0 if b.leaving else 1.0)
            slots.add_metric([b.name], SLOTS)
        held = GaugeMetricFamily("tensafe_held_requests", "", labels=("pool",))
        held.add_metric([POOL], len(sim.held[g]))
        states = GaugeMetricFamily("tensafe_pool_backends", "", labels=("pool", "state"))
        states.add_metric([POOL, "ready"], sum(1 for b in sim.backends if b.ready(sim.now)))
        states.add_metric([POOL, "starting"], sum(1 for b in sim.backends
                                                  if not b.leaving and sim.now < b.ready_at))
        yield from (queue, running, up, slots, held, states)
