"""Whether the registry and the quota store answer: checked in the background, reported by
``/health`` and by the ``tensafe_store_up`` gauge (``api.metrics``).

Each store is pinged every ``interval_s`` (at most ``timeout_s`` each, by the store's own
timeout) and marked down at once when a request finds it unavailable, so the state is never
older than one interval. ``/health`` reads the state and never waits on a store: a frozen Redis
must not make a liveness probe time out. ``/ready`` ignores it on purpose: a store outage
affects every replica alike, and taking them all out of the Service would turn a degraded
gateway into no gateway at all.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ..periodic import Periodic
from . import StoreUnavailable

log = logging.getLogger("tensafe.gateway")


class StoreHealth:
    def __init__(self, checks: dict[str, Callable[[], Awaitable[None]]], interval_s: float = 2.0) -> None:
        self.checks = checks  # store name -> its ping
        self.interval_s = interval_s
        self.up: dict[str, bool] = {name: True for name in checks}
        self._checker = Periodic("store-health", interval_s, self.check)

    def mark_down(self, store: str, reason: str) -> None:
        if self.up.get(store, False):
            log.warning("%s store unavailable: %s", store, reason)
        self.up[store] = False

    async def check(self) -> None:
        for name, ping in self.checks.items():
            try:
                await ping()
            except StoreUnavailable as exc:
                self.mark_down(name, exc.reason)
            else:
                if not self.up[name]:
                    log.warning("%s store available again", name)
                self.up[name] = True

    def view(self) -> dict[str, str]:
        return {name: "ok" if up else "unavailable" for name, up in self.up.items()}

    @property
    def ok(self) -> bool:
        return all(self.up.values())

    def start(self) -> None:
        self._checker.start()

    async def stop(self) -> None:
        await self._checker.stop()
