"""The backends behind the gateway, in pools, and the dispatch of each request to one of them.

Each backend is a ``Member`` of a named pool, with what the gateway keeps about it: its queue
(``SlotQueue``: the gateway fills at most its sequence slots and queues the rest), a circuit
breaker, its health and drain state, the measured time a request holds a slot, and a snapshot
of what it reports (capacity, residency) refreshed every ``refresh_s``. ``choose`` filters the
members (healthy, breaker closed or probing, not drained or leaving, able to hold the
adapter's rank) and asks the policy (``dispatch``) for one; ``slot`` holds a sequence slot on
it for the request's life. Members come and go at run time (``add``, ``remove``: discovery);
one that joins is first given the pool's hottest adapters (``warm``). While no backend that
could serve a request is ready (a pool scaled to zero), ``choose_held`` holds the request
until one is (``serving.hold``).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from cache import AdapterCache, Tier

from ..backends import Backend, Capacity
from .breaker import Breaker
from .dispatch import POLICIES, Ask, BackendView, Choice, LoadCosts
from .hold import HoldFull, HoldLimits, Holds
from .slotqueue import SlotQueue
from .slots import BackendSlots

log = logging.getLogger("tensafe.gateway")


class NoBackend(Exception):
    """No backend can take the request now (all down, open, drained or unfit); ``unready``:
    none that could serve it is ready (see ``Member.ready``), so it may wait for one."""

    def __init__(self, why: str, unready: bool = False) -> None:
        self.why = why
        self.unready = unready
        super().__init__(f"no backend can serve the request: {why}")


class NotHonoured(Exception):
    """No backend of the fleet honours a sampling extension the request uses."""

    def __init__(self, parameter: str) -> None:
        self.parameter = parameter
        super().__init__(f"no backend honours {parameter!r}")


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
    drained: bool = False  # by an operator (kept in the store: every replica honours it)
    leaving: bool = False  # gone from discovery: finishing what it holds
    up: bool = True  # the last health check
    health_detail: str = ""
    max_model_len: int = 0  # as the last healthy check said
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

    def ready(self) -> bool:
        """In service: healthy by its last check, neither drained nor leaving (its breaker aside)."""
        return self.up and not self.drained and not self.leaving

    def available(self) -> bool:
        return self.ready() and self.breaker.allows()

    def served(self, seconds: float) -> None:
        self.service_ms += 0.2 * (seconds * 1000 - self.service_ms)


class Held:
    """One request's sequence slot: it charges the tenant's service to the backend's queue."""

    __slots__ = ("queue", "tenant", "weight", "generated_tokens", "on_service")

    def __init__(self, queue: SlotQueue, tenant: str, weight: float,
                 on_service: Callable[[str, float], None] | None) -> None:
        self.queue, self.tenant, self.weight, self.on_service = queue, tenant, weight, on_service
        self.generated_tokens = 0

    def generated(self, completion_tokens: int) -> None:
        """The request has generated ``completion_tokens`` so far (cumulative)."""
        delta = completion_tokens - self.generated_tokens
        if delta > 0:
            self.generated_tokens = completion_tokens
            self.queue.charge(self.tenant, self.weight, output_tokens=delta)
            if self.on_service is not None:
                self.on_service(self.tenant, self.queue.output_weight * delta)


class Fleet:
    def __init__(self, cache: AdapterCache | None = None, *, policy: str = "affinity", refresh_s: float = 0.05,
                 queue_limit: int = 256, breaker: Callable[[], Breaker] = Breaker, health_timeout_s: float = 2.0,
                 fair: bool = True, output_weight: float = 2.0, holds: Mapping[str, HoldLimits] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``holds``: the configured pools and how many requests each holds, for how long, while
        none of its backends is ready (a pool not named there holds none)."""
        if policy not in POLICIES:
            raise ValueError(f"dispatch {policy!r} is not one of {', '.join(POLICIES)}")
        self.cache = cache
        self.policy = POLICIES[policy]()
        self.refresh_s = refresh_s
        self.queue_limit = queue_limit
        self._breaker = breaker
        self.health_timeout_s = health_timeout_s
        self._clock = clock
        self._refreshed = float("-inf")
        self.members: dict[str, Member] = {}
        self.fair = fair
        self.output_weight = output_weight
        self.holds = Holds(holds)
        self._joining: dict[str, str] = {}  # backends being warmed (known to the cache) -> their pool
        #: told how long each request waited for its slot (pool, tenant, seconds) and of each
        #: tenant's service (tenant, weighted tokens); the metrics listen
        self.on_wait: Callable[[str, str, float], None] | None = None
        self.on_service: Callable[[str, float], None] | None = None
        #: told of each backend that left (pool, backend): its metric series go
        self.on_leave: Callable[[str, str], None] | None = None

    def add(self, pool: str, backend: Backend) -> Member:
        """A started backend joins ``pool`` (names are unique across pools)."""
        if backend.name in self.members:
            raise ValueError(f"a backend named {backend.name!r} is already in the fleet")
        slots = max(1, backend.capacity().max_sequence_slots)
        queue = SlotQueue(slots, self.queue_limit, fair=self.fair, output_weight=self.output_weight)
        member = Member(pool, backend, queue, self._breaker())
        if self.cache is not None and self._joining.pop(backend.name, None) is None:
            self.cache.add_backend(backend.name, BackendSlots(backend))
        self.members[backend.name] = member
        self._refreshed = float("-inf")
        self.holds.changed()
        return member

    def pool_of(self, name: str) -> str:
        """The pool of backend ``name``, a member or one being warmed ("" for neither)."""
        member = self.members.get(name)
        return member.pool if member is not None else self._joining.get(name, "")

    # ---- warming a joining backend ------------------------------------------------------------
    def hottest(self, pool: str, n: int) -> list[str]:
        """The ``n`` adapters asked for most lately (``cache.heat``) among those in the CPU tier
        or in the slots of ``pool``'s members, hottest first (one never asked for is not hot)."""
        if self.cache is None or n <= 0:
            return []
        keys = self.cache.in_cpu()
        for m in self.members.values():
            if m.pool == pool:
                keys |= self.cache.in_slots(m.name)
        heat = {k: self.cache.heat.of(k) for k in keys}
        return sorted((k for k in keys if heat[k] > 0), key=lambda k: (-heat[k], k))[:n]

    async def warm(self, pool: str, backend: Backend, most: int) -> list[str]:
        """Before ``backend`` joins ``pool`` (``add``): load the pool's hottest adapters into it,
        at most ``most`` and no more than its free adapter slots, all at once; those loaded are
        returned, those that fail are logged. From here on the cache knows the backend; if it
        does not join after all, ``forget`` it."""
        if self.cache is None or backend.name in self.members:
            return []
        if backend.name not in self._joining:
            self.cache.add_backend(backend.name, BackendSlots(backend))
            self._joining[backend.name] = pool
        keys = self.hottest(pool, min(most, backend.capacity().free_adapter_slots))
        results = await asyncio.gather(*(self.cache.load(k, backend.name) for k in keys), return_exceptions=True)
        for key, result in zip(keys, results):
            if isinstance(result, BaseException):
                log.warning("backend %s/%s: adapter %s not warmed: %s", pool, backend.name, key, result)
        return [key for key, result in zip(keys, results) if result is None]

    def forget(self, name: str) -> None:
        """A backend that was warmed but did not join: the cache forgets it."""
        if self._joining.pop(name, None) is not None and self.cache is not None:
            self.cache.remove_backend(name)

    async def remove(self, name: str, grace_s: float = 30.0) -> None:
        """``name`` leaves: no new request goes to it, those it holds finish (up to ``grace_s``),
        then it is closed and forgotten."""
        member = self.members.get(name)
        if member is None:
            return
        member.leaving = True
        deadline = self._clock() + grace_s
        while (member.queue.holders or member.queue.waiting) and self._clock() < deadline:
            await asyncio.sleep(0.05)
        self.members.pop(name, None)
        if self.cache is not None:
            self.cache.remove_backend(name)
        if self.on_leave is not None:
            self.on_leave(member.pool, name)
        await member.backend.close()

    def pools(self) -> dict[str, list[Member]]:
        out: dict[str, list[Member]] = {}
        for m in self.members.values():
            out.setdefault(m.pool, []).append(m)
        return out

    # ---- state ---------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Read what the backends report (capacity, residency), at most every ``refresh_s``."""
        now = self._clock()
        if not force and now - self._refreshed < self.refresh_s:
            return
        self._refreshed = now
        for m in self.members.values():
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
        if self.cache is not None:  # and what this gateway itself loaded since the snapshot
            resident = resident | frozenset(self.cache.in_slots(m.name))
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
            rates={a: self.cache.heat.rate(a) for a in holders if a} if self.cache is not None else {},
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

    async def check(self) -> None:
        """Ask every backend whether it is healthy (bounded by ``health_timeout_s`` each, all at
        once); one that answers again after failing is used again, its breaker reset."""
        async def one(m: Member) -> None:
            try:
                health = await asyncio.wait_for(m.backend.health(), self.health_timeout_s)
                ok, detail = health.ok, health.detail
                if ok:
                    m.max_model_len = health.max_model_len
            except (TimeoutError, OSError) as exc:
                ok, detail = False, f"health check failed: {type(exc).__name__}"
            except Exception as exc:  # noqa: BLE001 - any failure of a backend's check means "not healthy"
                ok, detail = False, f"health check failed: {type(exc).__name__}: {exc}"[:200]
            if ok and not m.up:
                log.warning("backend %s is healthy again", m.key)
                m.breaker.success()
                recovered.append(m)
            elif not ok and m.up:
                log.warning("backend %s is unhealthy: %s", m.key, detail)
            m.up, m.health_detail = ok, detail

        recovered: list[Member] = []
        await asyncio.gather(*(one(m) for m in list(self.members.values())))
        if recovered:
            self.holds.changed()

    def idlest(self) -> list[Member]:
        """The available backends, the least busy first (for calls that take no slot)."""
        members = [m for m in self.members.values() if m.available()]
        return sorted(members, key=lambda m: (m.queue.holders + m.queue.waiting) / max(1, m.queue.capacity))

    def set_drained(self, drained: Iterable[str]) -> None:
        """The drain state from the store (keys ``pool/backend``)."""
        keys = set(drained)
        undrained = False
        for m in self.members.values():
            undrained |= m.drained and m.key not in keys
            m.drained = m.key in keys
        if undrained:
            self.holds.changed()

    # ---- dispatch ----------------------------------------------------------------------------
    def choose(self, adapter: str | None, rank: int = 0, exclude: frozenset[str] = frozenset(),
               needs: frozenset[str] = frozenset()) -> tuple[Member, Choice]:
        """A backend for the request (``needs``: the sampling extensions it uses; NotHonoured
        when no backend of the fleet, up or down, honours one of them)."""
        self.refresh()
        candidates = self.members.values()
        if needs and self.members:
            candidates = [m for m in candidates if needs <= m.backend.extensions]
            if not candidates:
                every = [m.backend.extensions for m in self.members.values()]
                raise NotHonoured(min(p for p in needs if not all(p in e for e in every)))
        candidates = [m for m in candidates if m.name not in exclude]
        members = [m for m in candidates if m.available() and m.snapshot is not None]
        if not members:
            why = "every backend is down, drained or failing" if candidates else "no backend is ready"
            raise NoBackend(why, unready=not any(m.ready() for m in candidates))
        fit = [m for m in members if not rank or not m.snapshot.capacity.max_lora_rank  # type: ignore[union-attr]
               or rank <= m.snapshot.capacity.max_lora_rank]  # type: ignore[union-attr]
        if not fit:
            raise NoBackend(f"no backend holds adapters of rank {rank}")
        if len(fit) == 1:  # nothing to weigh (one backend, the usual single-node case)
            choice = Choice(fit[0].name, "only_choice")
        else:
            choice = self.policy.choose(Ask(adapter, self.tier(adapter)), [self.view(m) for m in fit], self.costs())
        chosen = self.members[choice.backend]
        chosen.own += 1
        chosen.breaker.sent()
        return chosen, choice

    async def choose_held(self, adapter: str | None, rank: int = 0,
                          needs: frozenset[str] = frozenset()) -> tuple[Member, Choice]:
        """``choose``; but while no backend that could serve the request is ready, the request
        is held for the configured pools without a ready backend (``serving.hold``) and looks
        again whenever one may have become ready, then fails as ``choose`` does. NoBackend when
        it may not be held (a pool holds its most, or none at all) or none became ready in time."""
        changed = self.holds.next_change()
        try:
            return self.choose(adapter, rank, needs=needs)
        except NoBackend as exc:
            if not exc.unready:
                raise
            unready = exc
        pools = [p for p in self.holds.limits
                 if not any(m.pool == p and m.ready() for m in self.members.values())]
        timeout_s = self.holds.timeout_s(pools)
        if not timeout_s:
            raise unready
        try:
            with self.holds.hold(pools):
                async with asyncio.timeout(timeout_s):
                    while True:
                        await changed.wait()
                        changed = self.holds.next_change()
                        try:
                            return self.choose(adapter, rank, needs=needs)
                        except NoBackend as exc:
                            if not exc.unready:
                                raise
        except HoldFull as exc:
            raise NoBackend(str(exc)) from None
        except TimeoutError:
            raise NoBackend(f"no backend became ready within {timeout_s:g} s") from None

    @contextlib.asynccontextmanager
    async def slot(self, member: Member, adapter: str | None, tenant: str = "", weight: float = 1.0,
                   input_tokens: int = 0) -> AsyncIterator[Held]:
        """Hold one of ``member``'s sequence slots (waiting in its queue first, if need be), the
        tenant charged ``input_tokens`` on taking it and its output as it is generated."""
        key = adapter or ""
        if not member.queue.try_acquire():
            member.waiting[key] += 1
            reserved = (self.cache.reserved(adapter, member.name) if adapter is not None and self.cache is not None
                        else contextlib.nullcontext())
            queued = self._clock()
            try:
                with reserved:  # its adapter stays resident there while the request waits
                    await member.queue.acquire(tenant, weight)
            finally:
                _drop(member.waiting, key)
            if self.on_wait is not None:
                self.on_wait(member.pool, tenant, self._clock() - queued)
        elif self.on_wait is not None:
            self.on_wait(member.pool, tenant, 0.0)
        member.queue.charge(tenant, weight, input_tokens=input_tokens)
        if self.on_service is not None and input_tokens:
            self.on_service(tenant, float(input_tokens))
        member.running[key] += 1
        started = self._clock()
        try:
            yield Held(member.queue, tenant, weight, self.on_service)
        finally:
            _drop(member.running, key)
            member.queue.release()
            member.served(self._clock() - started)

    async def close(self) -> None:
        await asyncio.gather(*(m.backend.close() for m in self.members.values()))


def _drop(counts: collections.Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
