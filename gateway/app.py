"""The composition root: builds the backend, the model table, auth and the routes, and maps
every error to OpenAI's shape in one place. Nothing imports this module."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import errors
from .auth import ApiKeyAuth, Principal, ensure_dev_key
from .backends import Backend, LoraConfig, create_backend
from .generation import Completions
from .middleware import GatewayMiddleware
from .models import ModelTable
from .protocol import responses as wire
from .settings import Settings

log = logging.getLogger("tensafe.gateway")

_HTTP_ERRORS: dict[int, type[errors.ApiError]] = {404: errors.NotFound, 405: errors.MethodNotAllowed,
                                                 413: errors.PayloadTooLarge}


def _error_response(exc: errors.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ApiError)
    request.state.error_code = exc.code
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = _HTTP_ERRORS.get(exc.status_code, errors.InvalidRequest)
    message = {404: f"Unknown request URL: {request.method} {request.url.path[:200]}.",
               405: f"Method {request.method} is not allowed on {request.url.path[:200]}."}.get(
        exc.status_code, str(exc.detail))
    error = kind(message)
    error.status = exc.status_code
    response = _error_response(error)
    response.headers.update(exc.headers or {})
    return response


def load_local_adapters(spec: str) -> list[tuple[str, Path]]:
    """``name=PEFT_DIR,name2=PEFT_DIR2`` -> pairs (operator-provided development adapters)."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"adapters: expected name=PEFT_DIR, got {item!r}")
        out.append((name.strip(), Path(path.strip()).expanduser()))
    return out


class Gateway:
    """Holds what the routes need; its methods are the endpoints."""

    def __init__(self, settings: Settings, backend: Backend, auth: ApiKeyAuth) -> None:
        self.settings = settings
        self.backend = backend
        self.auth = auth
        self.models = ModelTable(settings.model_name, int(time.time()))
        self.completions = Completions(backend, self.models, max_body_bytes=settings.max_body_bytes,
                                       request_timeout_s=settings.request_timeout_s,
                                       retry_after_s=settings.retry_after_s)
        self.ready = False

    async def start(self) -> None:
        await self.backend.start()
        if self.settings.adapters:
            from engine.peft_dir import load_peft_dir  # reads PEFT directories into plain tensors

            for name, path in load_local_adapters(self.settings.adapters):
                config, tensors = load_peft_dir(path)
                adapter_id = f"local:{name}"
                await self.backend.load_adapter(adapter_id, tensors, LoraConfig(
                    config.rank, config.alpha, config.target_modules, config.use_rslora))
                self.models.add_adapter(name, adapter_id, int(time.time()))
                log.info("adapter %s loaded (rank %d, %s)", name, config.rank, ",".join(config.target_modules))
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.backend.close()

    def principal(self, request: Request) -> Principal:
        principal = self.auth.authenticate(request.headers.get("authorization"))
        request.state.tenant = principal.tenant
        return principal

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready_check(self, request: Request) -> Response:
        health = await self.backend.health()
        if self.ready and health.ok:
            return JSONResponse({"status": "ready", "model": self.settings.model_name})
        return JSONResponse({"status": "starting", "detail": health.detail}, status_code=503)

    async def list_models(self, request: Request) -> Response:
        principal = self.principal(request)
        cards = [wire.model_card(r.model, r.created, r.owned_by) for r in self.models.visible(principal)]
        return JSONResponse(wire.model_list(cards))

    async def get_model(self, request: Request) -> Response:
        principal = self.principal(request)
        route = self.models.resolve(request.path_params["model"], principal)
        return JSONResponse(wire.model_card(route.model, route.created, route.owned_by))

    async def chat(self, request: Request) -> Response:
        return await self.completions.chat(request, self.principal(request))

    async def text(self, request: Request) -> Response:
        return await self.completions.completions(request, self.principal(request))


def create_app(settings: Settings, backend: Backend | None = None,
               on_ready: Callable[[str], None] | None = None) -> Starlette:
    """The ASGI app. ``backend`` defaults to the one named in settings; ``on_ready`` gets the
    API key once the model is loaded (the development banner)."""
    backend = backend or create_backend(settings)
    key = settings.api_key
    if key is None:
        key, path, created = ensure_dev_key(settings.data_dir)
        log.info("API key: %s development key in %s", "generated a" if created else "using the", path)
    gateway = Gateway(settings, backend, ApiKeyAuth(key))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        if on_ready is not None:
            on_ready(key)
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route("/health", gateway.health, methods=["GET"]),
        Route("/ready", gateway.ready_check, methods=["GET"]),
        Route("/v1/models", gateway.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gateway.get_model, methods=["GET"]),
        Route("/v1/chat/completions", gateway.chat, methods=["POST"]),
        Route("/v1/completions", gateway.text, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan,
        middleware=[Middleware(GatewayMiddleware, access_log_enabled=settings.access_log)],
        exception_handlers={errors.ApiError: _api_error, HTTPException: _http_error},
    )
    app.state.gateway = gateway
    return app
