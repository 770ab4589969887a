"""Sliding windows over several gateway replicas' scrapes, merged per pool.

Each replica's histogram counters are summed into running totals of their increases, series
by series: a series that goes down restarted from zero (its new value is all increase), one
that is new since the replica's last scrape was created since (all increase too: the first
scrape of a replica is only its baseline), one that is gone adds nothing. A pool's TTFT
over the last ``window_s`` is the sum over replicas of each bucket's increase in that window;
its gauges (queue, running, held) are summed over the replicas' latest scrapes and averaged
over the window. A replica that stops answering drops out after ``forget_s``.
"""
from __future__ import annotations

import collections
import dataclasses
import math

from .exposition import PoolReading


@dataclasses.dataclass
class PoolState:
    """What the scaler knows of one pool now, merged over every gateway replica."""

    ttft_quantile_s: float | None  # None: no request measured in the window
    requests: float  # first tokens measured in the window
    throughput: float  # the same per second
    in_flight: float  # running + queued + held, the latest scrapes summed
    in_flight_mean: float  # the same, averaged over the window
    running_mean: float
    queued: float
    held: float
    backlog_growth: float  # queued + held, change per second over the window
    ready: int  # backends up (in any replica's view)
    ready_mean: float
    ready_min: int  # the fewest ready at any scrape in the window
    starting: int  # backends resolved but not answering yet
    slots: float  # sequence slots per backend (median of those reported; 0 when none)
    idle_s: float  # since a request was last seen (inf when never)
    replica_rps: float | None = None  # a replica's requests per second at full occupancy, once learned


@dataclasses.dataclass
class _Entry:
    t: float
    totals: dict[str, tuple[dict[float, float], float]]  # pool -> (bucket totals, count total)
    gauges: dict[str, PoolReading]


class _Replica:
    def __init__(self) -> None:
        self.entries: collections.deque[_Entry] = collections.deque()
        self.raw: dict[str, PoolReading] = {}
        self.totals: dict[str, tuple[dict[float, float], float]] = {}

    def add(self, t: float, readings: dict[str, PoolReading], keep_s: float) -> None:
        totals = dict(self.totals)  # a pool not in this scrape keeps its totals
        first = not self.entries
        for pool, r in readings.items():
            before = self.raw.get(pool, PoolReading())
            buckets, count = self.totals.get(pool, ({}, 0.0))
            buckets = dict(buckets)
            for series, les in r.buckets.items():
                was = before.buckets.get(series, {})
                for le, v in les.items():
                    buckets[le] = buckets.get(le, 0.0) + (0.0 if first else _increase(was.get(le), v))
            for series, v in r.count.items():
                count += 0.0 if first else _increase(before.count.get(series), v)
            totals[pool] = (buckets, count)
        self.raw, self.totals = readings, totals
        self.entries.append(_Entry(t, totals, readings))
        while len(self.entries) > 2 and self.entries[1].t <= t - keep_s:
            self.entries.popleft()

    def at_or_before(self, t: float) -> _Entry | None:
        found = None
        for e in self.entries:
            if e.t > t:
                break
            found = e
        return found if found is not None else (self.entries[0] if self.entries else None)


class Capacity:
    """A replica's throughput at full occupancy, per pool, learned whenever the pool runs
    saturated: its slots nearly all busy over the window, with a queue, the same replicas
    throughout (a moving average of those observations, at most every ``every_s``)."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.rps: dict[str, float] = {}
        self._at: dict[str, float] = {}

    def learn(self, pool: str, now: float, s: PoolState) -> None:
        """Update from ``s`` when it shows saturation, and tell ``s`` what is known."""
        saturated = (s.ready_min > 0 and s.ready_min == s.ready and s.slots > 0 and s.queued > 0
                     and s.running_mean >= 0.9 * s.ready_mean * s.slots and s.throughput > 0)
        if saturated and now - self._at.get(pool, -math.inf) >= self.every_s:
            observed = s.throughput / s.ready_mean
            known = self.rps.get(pool)
            self.rps[pool] = observed if known is None else known + 0.3 * (observed - known)
            self._at[pool] = now
        s.replica_rps = self.rps.get(pool)


_NONE = PoolReading()


def _increase(before: float | None, now: float) -> float:
    if before is None:
        return now  # a series created since the last scrape
    return now - before if now >= before else now  # restarted from zero


class FleetWatch:
    """Scrapes of every replica, kept for ``window_s`` (at least)."""

    def __init__(self, window_s: float = 30.0, forget_s: float = 60.0) -> None:
        self.window_s = window_s
        self.forget_s = forget_s
        self.replicas: dict[str, _Replica] = {}
        self.seen: dict[str, float] = {}  # replica -> last scrape time
        self.last_request: dict[str, float] = {}  # pool -> when a request was last seen
        self.capacity = Capacity(every_s=window_s / 3)

    def observe(self, replica: str, t: float, readings: dict[str, PoolReading]) -> None:
        rep = self.replicas.setdefault(replica, _Replica())
        previous = dict(rep.totals)
        rep.add(t, readings, keep_s=2 * self.window_s)
        self.seen[replica] = t
        for pool, r in readings.items():
            grew = rep.totals[pool][1] > previous.get(pool, ({}, 0.0))[1]
            if grew or r.in_flight > 0:
                self.last_request[pool] = t

    def forget_stale(self, now: float) -> None:
        for replica, t in list(self.seen.items()):
            if now - t > self.forget_s:
                self.replicas.pop(replica, None)
                self.seen.pop(replica, None)

    def state(self, pool: str, now: float, quantile: float, window_s: float | None = None) -> PoolState:
        window = self.window_s if window_s is None else window_s
        self.forget_stale(now)
        buckets: dict[float, float] = {}
        count = in_flight = queued = held = starting = running_mean = in_flight_mean = growth = 0.0
        span = 0.0
        ready_mean = ready_min = 0.0
        up: dict[str, bool] = {}
        slots: dict[str, float] = {}
        for rep in self.replicas.values():
            if not rep.entries:
                continue
            latest, start = rep.entries[-1], rep.at_or_before(now - window)
            assert start is not None
            span = max(span, latest.t - start.t)
            now_b, now_c = latest.totals.get(pool, ({}, 0.0))
            then_b, then_c = start.totals.get(pool, ({}, 0.0))
            for le, v in now_b.items():
                buckets[le] = buckets.get(le, 0.0) + v - then_b.get(le, 0.0)
            count += now_c - then_c
            r = latest.gauges.get(pool)
            if r is not None:
                in_flight += r.in_flight
                queued += r.queued
                held += r.held
                starting = max(starting, r.starting)
                for b, ok in r.up.items():
                    up[b] = up.get(b, False) or ok
                slots.update(r.slots)
            seen = [e.gauges.get(pool, _NONE) for e in rep.entries if e.t >= now - window] or [_NONE]
            in_flight_mean += sum(g.in_flight for g in seen) / len(seen)
            running_mean += sum(g.running for g in seen) / len(seen)
            ups = [sum(g.up.values()) for g in seen]
            ready_mean, ready_min = max(ready_mean, sum(ups) / len(ups)), max(ready_min, min(ups))
            first = start.gauges.get(pool, _NONE)
            if latest.t > start.t:
                growth += ((r or _NONE).queued + (r or _NONE).held - first.queued - first.held) / (latest.t - start.t)
        reported = sorted(slots.values())
        state = PoolState(
            ttft_quantile_s=quantile_of(buckets, quantile) if count > 0 else None, requests=count,
            throughput=count / span if span > 0 else 0.0, in_flight=in_flight, in_flight_mean=in_flight_mean,
            running_mean=running_mean, queued=queued, held=held, backlog_growth=growth,
            ready=sum(1 for ok in up.values() if ok), ready_mean=ready_mean, ready_min=int(ready_min),
            starting=int(starting), slots=reported[len(reported) // 2] if reported else 0.0,
            idle_s=math.inf if pool not in self.last_request else now - self.last_request[pool],
        )
        self.capacity.learn(pool, now, state)
        return state


def quantile_of(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated linearly inside its bucket (as
    PromQL's ``histogram_quantile``); in the +Inf bucket, the largest finite bound."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    total = buckets[edges[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for le in edges:
        cum = buckets[le]
        if cum >= rank:
            if math.isinf(le):
                return lower
            if cum == below:
                return le
            return lower + (le - lower) * (rank - below) / (cum - below)
        lower, below = le, cum
    return lower
