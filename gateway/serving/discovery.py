"""Where a pool's backends come from, kept current in the fleet.

A static pool's backends (``count`` in-process ones, or one per URL) join once, at start. A
DNS pool's are every address its ``dns_name`` resolves to (a headless Service lists one per
ready pod): resolved at start and every ``dns_interval_s`` after, a new address joins once its
backend answers, and one that is gone leaves (``Fleet.remove``: it finishes what it holds, no
new request goes to it). An address that fails to start is tried again at the next round.
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
        self._rounds = Periodic(f"discovery-{pool.name}", pool.dns_interval_s, self.resolve_logged)

    async def start(self) -> None:
        if self.pool.discovery == "dns":
            await self.resolve()
            self._rounds.start()
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
        p = self.pool
        urls = {url_of(p.dns_scheme, a, p.dns_port) for a in await self.resolver(p.dns_name, p.dns_port)}
        remote = kind_of(p).remote
        assert remote is not None, f"pool {p.name}: kind {p.kind} has no remote backends to discover"
        for url in sorted(urls - self._by_url.keys()):
            backend = remote(p, self.settings, url)
            try:
                await backend.start()
            except BackendError as exc:
                log.warning("pool %s: %s does not answer yet (%s)", p.name, url, exc)
                await backend.close()
                continue
            await self._join(backend)
            self._by_url[url] = backend.name
            log.info("pool %s: %s joined", p.name, url)
        for url in sorted(self._by_url.keys() - urls):
            name = self._by_url.pop(url)
            log.info("pool %s: %s left", p.name, url)
            await self.fleet.remove(name)

    async def resolve_logged(self) -> None:
        try:
            await self.resolve()
        except Exception:  # noqa: BLE001 - a failed round keeps the pool as it was; the next one retries
            log.exception("pool %s: discovery round failed", self.pool.name)

    async def stop(self) -> None:
        await self._rounds.stop()
