"""Requests held while no backend is ready to serve them.

A request that finds no ready backend (health check passing, not drained, not leaving) among
those that could serve it, because their pools are scaled to zero or their backends are still
starting, down or drained, waits for one instead of failing at once. It is held for every
configured pool that has no ready backend (with one pool, that pool) and counted there: the
``tensafe_held_requests`` gauge an autoscaler reads to bring a pool up from zero. It is
refused at once (503 ``no_backend``) when one of those pools holds its ``max_requests``
already, or when one of them does not hold requests at all (a bound of 0), and it waits at
most the shortest of their ``timeout_s``. Every event that may make a backend ready (one joins,
one passes its health check again, one is undrained) wakes every held request to look again;
nothing polls. Backends that are ready but failing (their circuit breakers open) hold nothing:
their requests fail fast, as the breaker intends.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class HoldLimits:
    """One pool's bounds on held requests: how many at once, and how long each."""

    max_requests: int = 256
    timeout_s: float = 60.0


class HoldFull(Exception):
    """A pool holds as many requests as it may."""

    def __init__(self, pool: str, held: int) -> None:
        self.pool, self.held = pool, held
        super().__init__(f"{held} requests wait for a backend of pool {pool} already")


class Holds:
    """The held requests, counted per pool, and the one signal that wakes them all."""

    def __init__(self, limits: Mapping[str, HoldLimits] | None = None) -> None:
        self.limits = dict(limits or {})
        #: requests held now, per configured pool (every one, 0 included)
        self.held: dict[str, int] = dict.fromkeys(self.limits, 0)
        self._changed = asyncio.Event()

    def next_change(self) -> asyncio.Event:
        """Set at the next ``changed()``: taken before looking for a backend, so a change that
        comes after the look is not missed."""
        return self._changed

    def changed(self) -> None:
        """A backend may have become ready: every held request looks again."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def timeout_s(self, pools: Sequence[str]) -> float:
        """How long a request held for ``pools`` may wait: 0 when it may not be held (no pool,
        or one that holds no requests)."""
        limits = [self.limits[p] for p in pools if p in self.limits]
        if not limits or any(lim.max_requests <= 0 or lim.timeout_s <= 0 for lim in limits):
            return 0.0
        return min(lim.timeout_s for lim in limits)

    @contextlib.contextmanager
    def hold(self, pools: Sequence[str]) -> Iterator[None]:
        """Count one request held for ``pools`` while the block runs (HoldFull when one of them
        holds its most already)."""
        pools = [p for p in pools if p in self.limits]
        for p in pools:
            if self.held[p] >= self.limits[p].max_requests:
                raise HoldFull(p, self.held[p])
        for p in pools:
            self.held[p] += 1
        try:
            yield
        finally:
            for p in pools:
                self.held[p] -= 1
