"""Where a pool's backends come from, kept current in the fleet.

A static pool's backends (``count`` in-process ones, or one per URL) join once, at start. A
DNS pool's are every address its ``dns_name`` resolves to (a headless Service lists one per
ready pod, and with ``publishNotReadyAddresses`` the pods still starting too): resolved at start
and every ``dns_interval_s`` after, a new address joins once its backend answers, and one that
is gone leaves (``Fleet.remove``: it finishes what it holds, no new request goes to it). An
address that does not answer yet is *starting* (``tensafe_pool_backends{state="starting"}``,
which the scaler counts as a replica on its way) and is tried again every ``PENDING_RETRY_S``,
so a pod that becomes ready joins within about a second, not a whole round later.
Before a backend takes requests the ``joining`` hook prepares it (the gateway's: its local
adapters and the pool's hottest ones). The resolver is injected, so tests point discovery at
names they control.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from ..backends import Backend, kind_of, static_backends
from ..backends.errors import BackendError
from ..periodic import Periodic
from ..settings import PoolSettings, Settings
from .fleet import Fleet

log = logging.getLogger("tensafe.gateway")
Resolver = Callable[[str, int], Awaitable[set[str]]]
PENDING_RETRY_S = 1.0
Joining = Callable[[str, Backend], Awaitable[None]]  # (pool, backend)


async def resolve_host(host: str, port: int) -> set[str]:
    """The addresses ``host`` resolves to now (none when it does not resolve)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return set()
    return {info[4][0] for info in infos}


def url_of(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


class PoolDiscovery:
    def __init__(self, pool: PoolSettings, settings: Settings, fleet: Fleet, *, joining: Joining | None = None,
                 resolver: Resolver = resolve_host, backends: list[Backend] | None = None) -> None:
        """``backends``: the static pool's backends when the caller made them already;
        ``joining`` runs on each started backend, with its pool's name, before it takes requests."""
        self.pool = pool
        self.settings = settings
        self.fleet = fleet
        self.joining = joining
        self.resolver = resolver
        self._static = backends
        self._by_url: dict[str, str] = {}  # url -> backend name
        self.pending: set[str] = set()  # resolved, not answering yet
        self._lock = asyncio.Lock()  # one round or retry at a time: an address joins once
        self._rounds = Periodic(f"discovery-{pool.name}", pool.dns_interval_s, self.resolve_logged)
        self._retries = Periodic(f"discovery-{pool.name}-pending", min(PENDING_RETRY_S, pool.dns_interval_s),
                                 self.retry_pending)

    async def start(self) -> None:
        if self.pool.discovery == "dns":
            await self.resolve()
            self._rounds.start()
            self._retries.start()
            return
        backends = self._static if self._static is not None else static_backends(self.pool, self.settings)
        await asyncio.gather(*(b.start() for b in backends))
        for backend in backends:
            await self._join(backend)

    async def _join(self, backend: Backend) -> None:
        try:
            if self.joining is not None:
                await self.joining(self.pool.name, backend)
            self.fleet.add(self.pool.name, backend)
        except BaseException:
            self.fleet.forget(backend.name)  # what warming it left in the cache
            raise

    async def resolve(self) -> None:
        """One round: addresses that appeared join, those that went leave."""
        async with self._lock:
            await self._resolve()

    async def _resolve(self) -> None:
        p = self.pool
        urls = {url_of(p.dns_scheme, a, p.dns_port) for a in await self.resolver(p.dns_name, p.dns_port)}
        self.pending &= urls
        for url in sorted(urls - self._by_url.keys()):
            await self._try(url)
        for url in sorted(self._by_url.keys() - urls):
            name = self._by_url.pop(url)
            log.info("pool %s: %s left", p.name, url)
            await self.fleet.remove(name)

    async def _try(self, url: str) -> None:
        p = self.pool
        remote = kind_of(p).remote
        assert remote is not None, f"pool {p.name}: kind {p.kind} has no remote backends to discover"
        backend = remote(p, self.settings, url)
        try:
            await backend.start()
        except BackendError as exc:
            if url not in self.pending:
                log.info("pool %s: %s does not answer yet (%s)", p.name, url, exc)
            self.pending.add(url)
            await backend.close()
            return
        self.pending.discard(url)
        await self._join(backend)
        self._by_url[url] = backend.name
        log.info("pool %s: %s joined", p.name, url)

    async def retry_pending(self) -> None:
        """Between rounds, try again the addresses that did not answer yet."""
        if not self.pending:
            return
        async with self._lock:
            await self._retry_pending()

    async def _retry_pending(self) -> None:
        for url in sorted(self.pending):
            if url in self.pending and url not in self._by_url:
                try:
                    await self._try(url)
                except Exception:  # noqa: BLE001 - logged; the next retry or round tries again
                    log.exception("pool %s: joining %s failed", self.pool.name, url)

    async def resolve_logged(self) -> None:
        try:
            await self.resolve()
        except Exception:  # noqa: BLE001 - a failed round keeps the pool as it was; the next one retries
            log.exception("pool %s: discovery round failed", self.pool.name)

    async def stop(self) -> None:
        await self._retries.stop()
        await self._rounds.stop()
