"""What operators and orchestrators poll: liveness, readiness and the Prometheus metrics."""
from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from ..serving.fleet import Fleet
from ..store.health import StoreHealth
from .callers import Callers
from .jsonresponse import JSONResponse
from .metrics import CONTENT_TYPE, Metrics


class OperationsApi:
    def __init__(self, callers: Callers, fleet: Fleet, stores: StoreHealth, metrics: Metrics, model: str,
                 started: Callable[[], bool]) -> None:
        self.callers = callers
        self.fleet = fleet
        self.stores = stores
        self.metrics = metrics
        self.model = model
        self.started = started

    async def health(self, request: Request) -> Response:
        """Alive: always 200 while the process serves; the stores' last known state beside it."""
        return JSONResponse({"status": "ok" if self.stores.ok else "degraded", "stores": self.stores.view()})

    async def ready(self, request: Request) -> Response:
        """Ready for traffic: started and some backend healthy (a store outage does not count: it
        hits every replica alike, and taking them all out of a Service helps nobody)."""
        members = list(self.fleet.members.values())
        healthy = [m for m in members if m.up and not m.drained and not m.leaving]
        if self.started() and healthy:
            return JSONResponse({"status": "ready", "model": self.model, "backends": len(healthy)})
        detail = "; ".join(f"{m.key}: {m.health_detail or 'down'}" for m in members) or "no backend"
        return JSONResponse({"status": "starting" if not self.started() else "unavailable", "detail": detail},
                            status_code=503)

    async def metrics_text(self, request: Request) -> Response:
        await self.callers.metrics_reader(request)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)
