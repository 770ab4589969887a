"""The operator's view of the fleet (``admin`` scope): every pool and backend with its health,
breaker, capacity, queue and resident adapters, and draining a backend (no new requests go to
it; those it holds finish). The drain state lives in the store, so every gateway replica
honours it and it survives restarts; replicas other than the one called pick it up at their
next fleet check (``health_interval_s``)."""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .. import errors
from ..serving.fleet import Fleet, Member
from ..store import Store
from .callers import Callers
from .jsonresponse import JSONResponse

Audit = Callable[..., Awaitable[None]]


def backend_view(m: Member) -> dict[str, Any]:
    c = m.backend.capacity()
    return {"object": "backend", "pool": m.pool, "id": m.name, "up": m.up, "health": m.health_detail,
            "breaker": m.breaker.state, "drained": m.drained, "leaving": m.leaving,
            "sequence_slots": {"max": c.max_sequence_slots, "free": c.free_sequence_slots},
            "adapter_slots": {"max": c.max_adapter_slots, "free": c.free_adapter_slots},
            "max_lora_rank": c.max_lora_rank or None, "running": m.queue.holders,
            "queued": m.queue.waiting + c.queue_depth, "service_ms": round(m.service_ms, 1),
            "resident_adapters": sorted(m.backend.adapters())}


class FleetApi:
    def __init__(self, callers: Callers, fleet: Fleet, store: Store, audit: Audit) -> None:
        self.callers = callers
        self.fleet = fleet
        self.store = store
        self.audit = audit

    async def backends(self, request: Request) -> Response:
        await self.callers.admin(request)
        pools = self.fleet.pools()
        data = [backend_view(m) for name in sorted(pools) for m in sorted(pools[name], key=lambda m: m.name)]
        return JSONResponse({"object": "list", "data": data,
                             "pools": {name: len(members) for name, members in sorted(pools.items())}})

    async def drain(self, request: Request) -> Response:
        return await self._set(request, True)

    async def undrain(self, request: Request) -> Response:
        return await self._set(request, False)

    async def _set(self, request: Request, drained: bool) -> Response:
        actor = (await self.callers.admin(request)).subject
        pool, name = request.path_params["pool"], request.path_params["backend"]
        member = self.fleet.members.get(name)
        if member is None or member.pool != pool:
            raise errors.NotFound(f"No backend '{name[:64]}' in pool '{pool[:32]}'.", code="backend_not_found")
        await self.store.set_drained(member.key, drained, int(time.time()))
        member.drained = drained
        await self.audit(actor, "backend.drain" if drained else "backend.undrain", member.key)
        return JSONResponse(backend_view(member))
