"""Pools of backends behind the gateway, and the dispatch of each request to one of them.

A ``Pool`` is a named set of backends of one kind serving one base model; each backend is a
``Member`` with what the gateway keeps about it: its queue (``SlotQueue``: the gateway fills
at most its sequence slots and queues the rest), a circuit breaker, its drain flag, the
measured time a request holds a slot, and a snapshot of its state refreshed every
``refresh_s`` (capacity from the backend, adapter residency from the cache). ``Fleet.choose``
filters a pool's members (healthy, breaker closed or probing, not drained, able to run the
adapter) and asks the pool's policy (``dispatch``) for one; ``Fleet.slot`` holds a sequence
slot on it for the request's life.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

from cache import AdapterCache, Tier

from ..backends import Backend, Capacity
from .breaker import Breaker
from .dispatch import POLICIES, Ask, BackendView, Choice, LoadCosts, Policy
from .slotqueue import SlotQueue

log = logging.getLogger("tensafe.gateway")


class NoBackend(Exception):
    """No member of the pool can take the request now (all down, open, drained or unfit)."""

    def __init__(self, pool: str, why: str) -> None:
        self.pool = pool
        self.why = why
        super().__init__(f"no backend of pool {pool!r} can serve the request: {why}")


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """What a backend reported at the last refresh."""

    capacity: Capacity
    resident: frozenset[str]
    loading: frozenset[str]


@dataclasses.dataclass
class Member:
    pool: str
    backend: Backend
    queue: SlotQueue
    breaker: Breaker
    drained: bool = False
    up: bool = True
    service_ms: float = 1000.0  # moving average of how long a request holds a slot
    own: int = 0  # dispatches since the last snapshot
    running: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # adapter -> holders
    waiting: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    snapshot: _Snapshot | None = None

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def key(self) -> str:
        return f"{self.pool}/{self.backend.name}"

    def available(self) -> bool:
        return self.up and not self.drained and self.breaker.allows()

    def served(self, seconds: float) -> None:
        self.service_ms += 0.2 * (seconds * 1000 - self.service_ms)


@dataclasses.dataclass
class Pool:
    name: str
    members: dict[str, Member]
    policy: Policy
    max_lora_rank: int = 1 << 30


class Fleet:
    """Every pool, the dispatch into them, and the snapshots the policies read."""

    def __init__(self, pools: Iterable[Pool], cache: AdapterCache | None = None, *, refresh_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pools = {p.name: p for p in pools}
        self.cache = cache
        self.refresh_s = refresh_s
        self._clock = clock
        self._refreshed = float("-inf")

    @staticmethod
    def pool_of(backends: Iterable[Backend], name: str = "default", policy: str = "affinity",
                queue_limit: int = 256, breaker: Callable[[], Breaker] = Breaker) -> Pool:
        members = {}
        for backend in backends:
            slots = max(1, backend.capacity().max_sequence_slots)
            members[backend.name] = Member(name, backend, SlotQueue(slots, queue_limit), breaker())
        return Pool(name, members, POLICIES[policy]())

    def members(self) -> Iterable[Member]:
        for pool in self.pools.values():
            yield from pool.members.values()

    # ---- snapshots ---------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Read what the backends report (capacity, residency), at most every ``refresh_s``."""
        now = self._clock()
        if not force and now - self._refreshed < self.refresh_s:
            return
        self._refreshed = now
        for m in self.members():
            c = m.backend.capacity()
            if c.max_sequence_slots and c.max_sequence_slots != m.queue.capacity:
                m.queue.resize(c.max_sequence_slots)
            loading = frozenset(self.cache.loading(m.name)) if self.cache is not None else frozenset()
            m.snapshot = _Snapshot(c, frozenset(m.backend.adapters()), loading)
            m.own = 0

    def view(self, m: Member) -> BackendView:
        """``m`` as the policies see it: the last snapshot, and what this gateway holds there now."""
        assert m.snapshot is not None
        c, resident = m.snapshot.capacity, m.snapshot.resident
        holders = {a: m.running[a] + m.waiting[a] for a in m.running.keys() | m.waiting.keys()}
        victim = self.cache.victim(m.name) if self.cache is not None else None
        return BackendView(
            name=m.name, sequence_slots=max(1, m.queue.capacity),
            running=max(m.queue.holders, c.max_sequence_slots - c.free_sequence_slots),
            waiting=m.queue.waiting + c.queue_depth, adapter_slots=c.max_adapter_slots,
            free_adapter_slots=c.free_adapter_slots, resident=resident, loading=m.snapshot.loading,
            running_adapters=frozenset(a for a, n in m.running.items() if n > 0),
            waiting_adapters=frozenset(a for a, n in m.waiting.items() if n > 0),
            holders=holders, own=m.own, service_ms=m.service_ms,
            victim_heat=self.cache.heat.of(victim) if victim is not None and self.cache is not None else 0.0)

    def costs(self) -> LoadCosts:
        if self.cache is None:
            return LoadCosts()
        c = self.cache.counters
        load = c.load_latency.count and c.load_latency.total / c.load_latency.count
        fetch = c.fetch_latency.count and c.fetch_latency.total / c.fetch_latency.count
        defaults = LoadCosts()
        cpu_ms = load * 1000 if load else defaults.cpu_ms
        return LoadCosts(cpu_ms=cpu_ms, disk_ms=cpu_ms + (fetch * 1000 if fetch else defaults.disk_ms))

    def tier(self, adapter: str | None) -> str:
        if adapter is None or self.cache is None:
            return "device"
        tiers = self.cache.status(adapter).tiers
        return Tier.DEVICE.value if Tier.DEVICE in tiers else (Tier.CPU.value if Tier.CPU in tiers else "disk")

    # ---- dispatch ----------------------------------------------------------------------------
    def choose(self, pool: str, adapter: str | None, rank: int = 0, exclude: frozenset[str] = frozenset()
               ) -> tuple[Member, Choice]:
        p = self.pools[pool]
        self.refresh()
        if rank > p.max_lora_rank:
            raise NoBackend(pool, f"rank {rank} exceeds the pool's max_lora_rank {p.max_lora_rank}")
        members = [m for m in p.members.values()
                   if m.name not in exclude and m.available() and m.snapshot is not None]
        if not members:
            raise NoBackend(pool, "every backend is down, drained or failing")
        views = [self.view(m) for m in members]
        choice = p.policy.choose(Ask(adapter, self.tier(adapter)), views, self.costs())
        chosen = p.members[choice.backend]
        chosen.own += 1
        chosen.breaker.sent()
        return chosen, choice

    @contextlib.asynccontextmanager
    async def slot(self, member: Member, adapter: str | None) -> AsyncIterator[None]:
        """Hold one of ``member``'s sequence slots (waiting in its queue first, if need be)."""
        key = adapter or ""
        member.waiting[key] += 1
        reserved = (self.cache.reserved(adapter, member.name) if adapter is not None and self.cache is not None
                    else contextlib.nullcontext())
        try:
            with reserved:  # its adapter stays resident there while the request waits
                await member.queue.acquire()
        finally:
            _drop(member.waiting, key)
        member.running[key] += 1
        started = self._clock()
        try:
            yield
        finally:
            _drop(member.running, key)
            member.queue.release()
            member.served(self._clock() - started)


def _drop(counts: collections.Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
