"""The worker's ASGI app: the Backend protocol's calls as HTTP routes (shapes in the package
docstring), behind the token gate and the capacity stamp. Any Backend can stand behind it;
``tensafe worker`` puts the embedded engine there.

Adapters arrive as a safetensors body, are parsed in memory (``safetensors.torch.load``) and
go straight into the engine's slots: the worker never writes them anywhere.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from ..backends.base import Backend
from ..backends.errors import AdapterProblem, BackendError, BadRequest
from ..bearer import TokenGate
from . import wire
from .bodies import BodyTooLarge, parse_json, read_body
from .metrics import CONTENT_TYPE, Requests, VllmCollector, WorkerMetrics
from .stamp import CapacityStamp
from .stream import ChunkStream, refusal

log = logging.getLogger("tensafe.worker")


@dataclasses.dataclass(frozen=True)
class WorkerLimits:
    max_body_bytes: int  # JSON bodies
    max_adapter_bytes: int  # safetensors bodies
    max_queue: int  # what the backend was configured with, reported to clients
    max_lora_rank: int


class Worker:
    """What the routes need: the backend, its limits and the book of requests in flight."""

    def __init__(self, backend: Backend, limits: WorkerLimits) -> None:
        self.backend = backend
        self.limits = limits
        self.requests = Requests()
        self.model = backend.name
        self.max_model_len = 0
        self.metrics = WorkerMetrics(VllmCollector(backend, self.requests, lambda: self.model))

    async def start(self) -> None:
        await self.backend.start()
        health = await self.backend.health()
        self.model, self.max_model_len = health.model, health.max_model_len

    async def close(self) -> None:
        await self.backend.close()

    def _adapters(self) -> dict[str, list[str]]:
        return {"adapters": self.backend.adapters()}

    async def generate(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.limits.max_body_bytes)
        except BodyTooLarge as exc:
            return refusal(BadRequest(str(exc)), status=413)
        breq = wire.request_from(parse_json(body))
        return ChunkStream(self.backend.generate(breq), adapter_id=breq.adapter_id, requests=self.requests)

    async def abort(self, request: Request) -> Response:
        body = parse_json(await read_body(request, self.limits.max_body_bytes))
        rid = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(rid, str):
            raise BadRequest("request_id must be a string", param="request_id")
        self.backend.abort(rid)
        return JSONResponse({"request_id": rid})

    async def put_adapter(self, request: Request) -> Response:
        adapter_id = request.path_params["adapter_id"]
        config = wire.lora_from(request.headers.get(wire.LORA_HEADER))
        try:
            body = await read_body(request, self.limits.max_adapter_bytes)
        except BodyTooLarge as exc:
            return refusal(AdapterProblem(f"adapter {adapter_id!r}: {exc}", adapter_id, "invalid"), status=413)
        try:
            tensors = await asyncio.to_thread(load_safetensors, body)
        except (SafetensorError, ValueError) as exc:
            raise AdapterProblem(f"adapter {adapter_id!r} is not a safetensors body: {exc}", adapter_id,
                                 "invalid") from None
        await self.backend.load_adapter(adapter_id, tensors, config)
        log.info("adapter %s loaded (rank %d, %s, %d bytes)", adapter_id, config.rank,
                 ",".join(config.target_modules), len(body))
        return JSONResponse({"adapter_id": adapter_id, **self._adapters()}, status_code=201)

    async def delete_adapter(self, request: Request) -> Response:
        adapter_id = request.path_params["adapter_id"]
        await self.backend.unload_adapter(adapter_id)
        log.info("adapter %s unloaded", adapter_id)
        return JSONResponse(self._adapters())

    async def adapters(self, request: Request) -> Response:
        return JSONResponse(self._adapters())

    async def capacity(self, request: Request) -> Response:
        return JSONResponse({**wire.capacity_fields(self.backend.capacity()), "max_queue": self.limits.max_queue,
                             "max_lora_rank": self.limits.max_lora_rank, "max_model_len": self.max_model_len,
                             "max_adapter_bytes": self.limits.max_adapter_bytes,
                             "extensions": sorted(self.backend.extensions), **self._adapters()})

    async def model_config(self, request: Request) -> Response:
        return JSONResponse(await self.backend.model_config())

    async def health(self, request: Request) -> Response:
        h = await self.backend.health()
        return JSONResponse({"ok": h.ok, "model": h.model, "max_model_len": h.max_model_len, "detail": h.detail},
                            status_code=200 if h.ok else 503)

    async def tokenize(self, request: Request) -> Response:
        args = wire.tokenize_from(parse_json(await read_body(request, self.limits.max_body_bytes)))
        tokens = await self.backend.tokenize(**args)
        return JSONResponse({"tokens": tokens.ids, "token_strs": tokens.strings})

    async def detokenize(self, request: Request) -> Response:
        ids = wire.detokenize_from(parse_json(await read_body(request, self.limits.max_body_bytes)))
        return JSONResponse({"prompt": await self.backend.detokenize(ids)})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/generate", self.generate, methods=["POST"]),
            Route("/v1/abort", self.abort, methods=["POST"]),
            Route("/v1/adapters", self.adapters, methods=["GET"]),
            Route("/v1/adapters/{adapter_id:path}", self.put_adapter, methods=["PUT"]),
            Route("/v1/adapters/{adapter_id:path}", self.delete_adapter, methods=["DELETE"]),
            Route("/v1/capacity", self.capacity, methods=["GET"]),
            Route("/v1/model-config", self.model_config, methods=["GET"]),
            Route("/v1/tokenize", self.tokenize, methods=["POST"]),
            Route("/v1/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ]


async def _backend_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BackendError)
    return refusal(exc)


def create_worker_app(backend: Backend, limits: WorkerLimits, tokens: tuple[str, ...], *,
                      on_ready: Callable[[], None] | None = None,
                      on_stopped: Callable[[], None] | None = None) -> ASGIApp:
    """The worker's ASGI app; the lifespan starts the backend (``on_ready`` then) and closes it
    (``on_stopped`` once it is closed)."""
    worker = Worker(backend, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await worker.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            try:
                await worker.close()
            finally:
                if on_stopped is not None:
                    on_stopped()

    app = Starlette(routes=worker.routes(), lifespan=lifespan, exception_handlers={BackendError: _backend_error})
    app.state.worker = worker
    return TokenGate(CapacityStamp(app, backend), tokens)
