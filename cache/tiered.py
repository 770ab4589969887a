"""The tiered adapter cache: disk (encrypted packages) -> CPU (decrypted tensors under a byte
budget) -> device (backend slots).

The CPU tier keeps each adapter in the forms its backends load, by layout: as opened (layout
"", what a backend without a layout of its own takes) and as each backend kind prepares it
(the embedded engine's stacked slots, say), so a warm load is a plain copy for every kind. A
form no registered backend loads is not kept; one that is missing is prepared from the opened
form, re-opened from disk if that is gone. Backends of one layout share its form. An entry's
size is that of all its forms.

All state lives on the event loop (one owner, no thread locks); the slow parts, verify + decrypt
and the copy into a slot, run off the loop inside the source and the slot backend, so a request
whose adapter is loading waits without holding up requests for resident adapters.

Verbs are explicit and idempotent: ``fetch`` (disk -> CPU), ``load`` (CPU -> slot),
``offload`` (slot -> CPU), ``evict`` (CPU -> gone; the package stays on disk) and ``remove``
(deletion: every tier at once). ``lease`` wraps one request: it makes the adapter resident and
keeps it in its slot until the request ends. Concurrent requests for a cold adapter share one
fetch and one load (single-flight).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

from .errors import AdapterBusy, AdapterPinned, AdapterUnavailable, CacheError, UnknownAdapter
from .heat import Heat
from .lru import ByteLRU
from .stats import CacheCounters
from .types import AdapterSource, AdapterStatus, Decrypted, SlotBackend, State, Tier

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Forms:
    """An adapter in the CPU tier: its forms by layout (one object may stand for several)."""

    tenant: str
    forms: dict[str, Decrypted]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in {id(f): f for f in self.forms.values()}.values())


@dataclasses.dataclass
class _Device:
    """One backend's slots as the cache tracks them."""

    name: str
    slots: SlotBackend
    order: dict[str, None] = dataclasses.field(default_factory=dict)  # resident, least recent first
    leases: dict[str, int] = dataclasses.field(default_factory=dict)
    #: requests between "my adapter is loaded" and taking their lease: not evictable, or two
    #: requests for different adapters could keep evicting each other's fresh load (livelock)
    pending: dict[str, int] = dataclasses.field(default_factory=dict)
    loading: dict[str, asyncio.Task] = dataclasses.field(default_factory=dict)
    doomed: set[str] = dataclasses.field(default_factory=set)  # unload when the last lease ends
    #: held adapters a waiting load needs the slot of: no new lease until it is evicted (key ->
    #: loads waiting on it), so a stream of requests for resident adapters cannot starve others
    draining: dict[str, int] = dataclasses.field(default_factory=dict)
    capacity: int = 0  # slots in all
    admitted: int = 0  # loads given a slot and still copying (outside ``room``)
    room: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    released: asyncio.Condition = dataclasses.field(default_factory=asyncio.Condition)

    def touch(self, key: str) -> None:
        self.order.pop(key, None)
        self.order[key] = None


class AdapterCache:
    def __init__(
        self,
        source: AdapterSource,
        *,
        cpu_budget_bytes: int,
        tenant_share: float = 0.5,
        failure_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.counters = CacheCounters()
        self._cpu: ByteLRU[_Forms] = ByteLRU(cpu_budget_bytes, owner_share=tenant_share, name="cpu")
        self._devices: dict[str, _Device] = {}
        self._fetching: dict[tuple[str, str], asyncio.Task] = {}  # (key, layout) -> its single flight
        self._failed: dict[str, tuple[str, float]] = {}
        self._generation: dict[str, int] = {}  # bumped by remove(): stale fetches are dropped
        self._background: set[asyncio.Task] = set()
        self._failure_ttl = failure_ttl_s
        self._clock = clock
        self.heat = Heat(clock=clock)  # requests per adapter lately (every lease counts)
        #: told of every load into a slot: (backend, tier it came from: "cpu" or "disk", seconds)
        self.on_load: Callable[[str, str, float], None] | None = None

    # ---- backends -----------------------------------------------------------------------
    def add_backend(self, name: str, slots: SlotBackend) -> None:
        """Adapters already in ``slots`` (e.g. the gateway's local adapters) are not the cache's:
        they keep their slots and are never chosen for eviction."""
        self._devices[name] = _Device(name, slots, capacity=slots.free_slots())

    def remove_backend(self, name: str) -> None:
        """``name`` is gone (its process ended or left its pool): its slots are forgotten."""
        dev = self._devices.pop(name, None)
        if dev is not None:
            for task in dev.loading.values():
                task.cancel()

    def _layouts(self) -> dict[str, SlotBackend]:
        """Each layout the registered backends load, and one backend that prepares it."""
        return {d.slots.layout: d.slots for d in self._devices.values()}

    def _device(self, backend: str) -> _Device:
        try:
            return self._devices[backend]
        except KeyError:
            raise CacheError(f"unknown backend {backend!r}") from None

    # ---- disk -> CPU ------------------------------------------------------------------------
    async def fetch(self, key: str, layout: str = "") -> Decrypted:
        """``key`` in the CPU tier in ``layout`` ("" = as opened), opened and prepared first if
        need be (once, however many ask at the same time)."""
        failed = self._failed.get(key)
        if failed is not None:
            reason, when = failed
            if self._clock() - when < self._failure_ttl:
                raise AdapterUnavailable(key, reason)
            del self._failed[key]
        entry = self._cpu.get(key)
        if entry is not None and layout in entry.forms:
            self.counters.cpu_hits += 1
            return entry.forms[layout]
        self.counters.cpu_misses += 1
        flight = (key, layout)
        task = self._fetching.get(flight)
        if task is None:
            task = asyncio.create_task(self._fetch(key, layout), name=f"fetch:{key}:{layout}")
            self._fetching[flight] = task
            task.add_done_callback(lambda _t, f=flight: self._fetching.pop(f, None))
        return await asyncio.shield(task)

    async def _fetch(self, key: str, layout: str) -> Decrypted:
        generation = self._generation.get(key, 0)
        t0 = time.perf_counter()
        try:
            entry = self._cpu.peek(key)
            opened = entry.forms.get("") if entry is not None else None
            if opened is None:
                self.counters.fetches += 1
                opened = await self.source.open(key)
            form = opened
            if layout:
                preparer = self._layouts().get(layout)
                if preparer is None:
                    raise CacheError(f"no backend loads layout {layout!r}")
                form = await asyncio.to_thread(preparer.prepare, opened)
        except UnknownAdapter:
            raise
        except AdapterUnavailable as exc:
            self._fail(key, exc.reason)
            raise
        except CacheError as exc:
            self._fail(key, str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 - any source failure marks only this adapter failed
            self._fail(key, _reason(exc))
            raise AdapterUnavailable(key, _reason(exc)) from exc
        self.counters.fetch_latency.observe(time.perf_counter() - t0)
        if self._generation.get(key, 0) != generation:
            raise UnknownAdapter(key)  # removed while it was being opened
        self._keep(key, opened, layout, form)
        return form

    def _keep(self, key: str, opened: Decrypted, layout: str, form: Decrypted) -> None:
        """Add ``form`` to the entry of ``key``, keeping only the forms some backend loads."""
        entry = self._cpu.peek(key)
        forms = dict(entry.forms) if entry is not None else {}
        forms[layout] = form
        wanted = self._layouts().keys() | {layout}
        if "" in wanted:
            forms[""] = opened
        kept = _Forms(opened.tenant, {k: v for k, v in forms.items() if k in wanted})
        evicted = self._cpu.put(key, kept, kept.nbytes, opened.tenant)
        self.counters.cpu_evictions += len(evicted)

    def _fail(self, key: str, reason: str) -> None:
        self.counters.fetch_failures += 1
        self._failed[key] = (reason, self._clock())
        log.warning("adapter %s failed to open: %s", key, reason)

    # ---- CPU -> slot ----------------------------------------------------------------------
    async def load(self, key: str, backend: str) -> None:
        dev = self._device(backend)
        if key in dev.order:
            self.counters.device_hits += 1
            dev.touch(key)
            return
        self.counters.device_misses += 1
        task = dev.loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(dev, key), name=f"load:{backend}:{key}")
            dev.loading[key] = task
            task.add_done_callback(lambda _t, k=key: dev.loading.pop(k, None))
        await asyncio.shield(task)

    async def _load(self, dev: _Device, key: str) -> None:
        entry = self._cpu.peek(key)
        tier = "cpu" if entry is not None and (dev.slots.layout in entry.forms or "" in entry.forms) else "disk"
        started = time.perf_counter()
        adapter = await self.fetch(key, dev.slots.layout)
        fetched_s = time.perf_counter() - started
        async with dev.room:  # choosing victims and taking a slot; the copy itself runs outside
            if key in dev.order:
                return
            busy: set[str] = set()  # idle here, but serving another gateway replica's requests
            drain: str | None = None
            try:
                while self._full(dev):
                    victim = self.victim(dev.name, skip=busy)
                    if victim is None:  # every slot serves a request or is loading: wait for one
                        if drain is None:  # and make sure one is let go
                            drain = self._drain(dev, key)
                        async with dev.released:
                            with contextlib.suppress(TimeoutError):  # a slot freed elsewhere tells nobody here
                                await asyncio.wait_for(dev.released.wait(), 0.5)
                        busy.clear()
                        continue
                    try:
                        await self._unload(dev, victim)
                    except AdapterBusy:
                        busy.add(victim)
            finally:
                if drain is not None and not _decrement(dev.draining, drain):
                    async with dev.released:
                        dev.released.notify_all()
            dev.admitted += 1
        t0 = time.perf_counter()
        try:  # several loads copy at once (the engine batches them between two steps)
            await dev.slots.load(key, adapter)
            dev.touch(key)
        finally:
            dev.admitted -= 1
            async with dev.released:  # a load waiting for room may now find a victim
                dev.released.notify_all()
        self.counters.loads += 1
        copied_s = time.perf_counter() - t0
        self.counters.load_latency.observe(copied_s)  # the copy alone, not the wait for a slot
        if self.on_load is not None:
            self.on_load(dev.name, tier, fetched_s + copied_s)

    @staticmethod
    def _drain(dev: _Device, loading: str) -> str | None:
        """The held adapter that frees its slot soonest (the fewest leases), marked draining."""
        held = [k for k in dev.order if k != loading and k not in dev.draining and dev.leases.get(k)]
        if not held:
            return None
        key = min(held, key=lambda k: dev.leases[k])
        dev.draining[key] = dev.draining.get(key, 0) + 1
        return key

    @staticmethod
    def _full(dev: _Device) -> bool:
        if dev.admitted:  # the backend may or may not count those loads yet: count them here
            return len(dev.order) + dev.admitted >= dev.capacity
        return dev.slots.free_slots() <= 0

    async def _unload(self, dev: _Device, key: str) -> None:
        await dev.slots.unload(key)
        dev.order.pop(key, None)
        dev.doomed.discard(key)
        self.counters.offloads += 1

    @contextlib.asynccontextmanager
    async def lease(self, key: str, backend: str) -> AsyncIterator[None]:
        """Make ``key`` resident on ``backend`` and keep it there until the block exits."""
        dev = self._device(backend)
        self.heat.add(key)
        dev.pending[key] = dev.pending.get(key, 0) + 1
        leased = False
        try:
            while True:
                if key in dev.doomed:
                    raise UnknownAdapter(key)
                while key in dev.draining:  # a waiting load needs its slot: let it go first
                    async with dev.released:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(dev.released.wait(), 0.5)
                await self.load(key, backend)
                if key in dev.order:  # still resident once this task resumed
                    break
            dev.leases[key] = dev.leases.get(key, 0) + 1
            leased = True
        finally:
            _decrement(dev.pending, key)
            if not leased:
                async with dev.released:
                    dev.released.notify_all()
        try:
            yield
        finally:
            if not _decrement(dev.leases, key) and key in dev.doomed:
                await self._unload(dev, key)
            async with dev.released:
                dev.released.notify_all()

    def victim(self, backend: str, skip: set[str] | frozenset[str] = frozenset()) -> str | None:
        """The adapter a load into ``backend`` would evict now: its coldest idle one (the least
        recent among equally cold ones)."""
        dev = self._device(backend)
        idle = [k for k in dev.order if not dev.leases.get(k) and k not in skip
                and (not dev.pending.get(k) or k in dev.draining)]
        return min(idle, key=self.heat.of) if idle else None

    def in_slots(self, backend: str) -> set[str]:
        """The adapters this cache has in ``backend``'s slots right now."""
        return set(self._device(backend).order)

    def in_cpu(self) -> set[str]:
        """The adapters in the CPU tier right now."""
        return set(self._cpu.keys())

    def loading(self, backend: str) -> set[str]:
        """The adapters being loaded into ``backend``'s slots right now."""
        return set(self._device(backend).loading)

    @contextlib.contextmanager
    def reserved(self, key: str, backend: str) -> Iterator[None]:
        """While the block runs, ``key`` is not evicted from ``backend`` (if it is resident) to
        make room for another adapter: a request queued for it there will lease it soon."""
        dev = self._device(backend)
        dev.pending[key] = dev.pending.get(key, 0) + 1
        try:
            yield
        finally:
            _decrement(dev.pending, key)

    def resident(self, key: str, backend: str) -> bool:
        """Whether ``key`` is in a slot of ``backend`` right now (no counters touched)."""
        return key in self._device(backend).order

    def prefetch(self, key: str, backend: str | None = None) -> asyncio.Task:
        """Warm ``key`` ahead of a request (errors are recorded, not raised)."""
        coro = self.load(key, backend) if backend else self.warm(key)
        task = asyncio.create_task(coro, name=f"prefetch:{key}")
        self._background.add(task)
        task.add_done_callback(self._prefetched)
        return task

    def _prefetched(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("prefetch failed: %s", task.exception())

    # ---- downward moves ----------------------------------------------------------------------
    async def offload(self, key: str, backend: str) -> None:
        dev = self._device(backend)
        if key not in dev.order:
            return
        if dev.leases.get(key):
            raise AdapterBusy(key, backend, dev.leases[key])
        async with dev.room:
            if key in dev.order:
                await self._unload(dev, key)

    def evict(self, key: str) -> None:
        """CPU -> gone (slots keep serving it; the package stays on disk)."""
        if self._cpu.is_pinned(key):
            raise AdapterPinned(key)
        if self._cpu.remove(key) is not None:
            self.counters.cpu_evictions += 1

    async def remove(self, key: str) -> None:
        """Deletion: gone from every tier at once (a slot still serving requests is unloaded as
        soon as the last of them ends, and no new request can lease it)."""
        self._generation[key] = self._generation.get(key, 0) + 1
        self._failed.pop(key, None)
        while self._cpu.is_pinned(key):
            self._cpu.unpin(key)
        self._cpu.remove(key)
        for dev in self._devices.values():
            if key not in dev.order and key not in dev.loading:
                continue
            task = dev.loading.get(key)
            if task is not None:
                with contextlib.suppress(CacheError, asyncio.CancelledError):
                    await asyncio.shield(task)
            if dev.leases.get(key):
                dev.doomed.add(key)
            elif key in dev.order:
                async with dev.room:
                    await self._unload(dev, key)

    # ---- pinning and introspection ------------------------------------------------------
    async def warm(self, key: str) -> None:
        """Bring ``key`` into the CPU tier in every layout its backends load."""
        for layout in self._layouts() or {"": None}:
            await self.fetch(key, layout)

    async def pin(self, key: str) -> None:
        """Keep ``key`` in the CPU tier, in every layout its backends load."""
        await self.warm(key)
        self._cpu.pin(key)

    def unpin(self, key: str) -> None:
        self._cpu.unpin(key)

    def status(self, key: str) -> AdapterStatus:
        tiers = [Tier.DISK]
        backends = tuple(name for name, d in self._devices.items() if key in d.order)
        if key in self._cpu:
            tiers.append(Tier.CPU)
        if backends:
            tiers.append(Tier.DEVICE)
        failed = self._failed.get(key)
        if failed is not None:
            state = State.FAILED
        elif any(key in d.loading for d in self._devices.values()):
            state = State.LOADING
        elif any(flight[0] == key for flight in self._fetching):
            state = State.FETCHING
        elif backends:
            state = State.IN_SLOT
        elif key in self._cpu:
            state = State.IN_CPU
        else:
            state = State.ON_DISK
        return AdapterStatus(
            key=key, state=state, tiers=tuple(tiers), backends=backends, pinned=self._cpu.is_pinned(key),
            nbytes=self._cpu.size_of(key), reason=failed[0] if failed else None,
        )

    def stats(self) -> dict:
        c = self.counters
        tenants: dict[str, int] = {}
        for key in self._cpu.keys():
            entry = self._cpu.peek(key)
            if entry is not None:
                tenants[entry.tenant] = tenants.get(entry.tenant, 0) + entry.nbytes
        return {
            "cpu": {"bytes": self._cpu.used, "budget_bytes": self._cpu.budget, "adapters": len(self._cpu),
                    "hits": c.cpu_hits, "misses": c.cpu_misses, "hit_rate": c.hit_rate("cpu"),
                    "evictions": c.cpu_evictions},
            "device": {
                name: {"adapters": len(d.order), "free_slots": d.slots.free_slots(), "leased": sum(d.leases.values())}
                for name, d in self._devices.items()
            } | {"hits": c.device_hits, "misses": c.device_misses, "hit_rate": c.hit_rate("device")},
            "fetches": c.fetches, "fetch_failures": c.fetch_failures, "loads": c.loads, "offloads": c.offloads,
            "fetch_latency": c.fetch_latency.summary(), "load_latency": c.load_latency.summary(),
            "tenants": {t: {"cpu_bytes": b} for t, b in sorted(tenants.items())},
        }

    def tenant_stats(self, tenant: str) -> dict:
        keys = [k for k in self._cpu.keys() if (a := self._cpu.peek(k)) is not None and a.tenant == tenant]
        return {"cpu_bytes": self._cpu.owner_bytes(tenant), "cpu_adapters": len(keys),
                "cpu_share_bytes": self._cpu.owner_limit}

    async def close(self) -> None:
        for task in list(self._background) + list(self._fetching.values()):
            task.cancel()
        for dev in self._devices.values():
            for task in list(dev.loading.values()):
                task.cancel()


def _decrement(counts: dict[str, int], key: str) -> int:
    """Count one holder of ``key`` out; the entry goes when none is left. Returns what is left."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
    return left


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
