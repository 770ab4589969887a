"""What operators and orchestrators poll: liveness, readiness and the Prometheus metrics."""
from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from ..backends import Backend
from ..store.health import StoreHealth
from .callers import Callers
from .jsonresponse import JSONResponse
from .metrics import CONTENT_TYPE, Metrics


class OperationsApi:
    def __init__(self, callers: Callers, backend: Backend, stores: StoreHealth, metrics: Metrics, model: str,
                 started: Callable[[], bool]) -> None:
        self.callers = callers
        self.backend = backend
        self.stores = stores
        self.metrics = metrics
        self.model = model
        self.started = started

    async def health(self, request: Request) -> Response:
        """Alive: always 200 while the process serves; the stores' last known state beside it."""
        return JSONResponse({"status": "ok" if self.stores.ok else "degraded", "stores": self.stores.view()})

    async def ready(self, request: Request) -> Response:
        """Ready for traffic: started and the backend healthy (a store outage does not count: it
        hits every replica alike, and taking them all out of a Service helps nobody)."""
        health = await self.backend.health()
        if self.started() and health.ok:
            return JSONResponse({"status": "ready", "model": self.model})
        return JSONResponse({"status": "starting", "detail": health.detail}, status_code=503)

    async def metrics_text(self, request: Request) -> Response:
        await self.callers.admin(request, "Metrics")
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)
