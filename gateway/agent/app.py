"""The agent's ASGI app: its routes (shapes in the package docstring) behind the token gate.
Bodies are read whole, bounded, and written only into the memory-backed root."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from safetensors import SafetensorError, deserialize
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from ..backends.errors import AdapterProblem, BackendError, BadRequest
from ..bearer import TokenGate
from ..worker import wire
from ..worker.bodies import BodyTooLarge, parse_json, read_body
from .holdings import Holdings

log = logging.getLogger("tensafe.agent")
CONFIG_HEADER = "x-tensafe-peft-config"
MAX_CONFIG_BYTES = 16384
RECONCILE_S = 5.0


def peft_config_from(header: str | None, adapter_id: str) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` from its header: a PEFT LoRA config."""
    if not header:
        raise BadRequest(f"the {CONFIG_HEADER} header is missing", param=CONFIG_HEADER)
    if len(header) > MAX_CONFIG_BYTES:
        raise BadRequest(f"the {CONFIG_HEADER} header is over {MAX_CONFIG_BYTES} bytes", param=CONFIG_HEADER)
    try:
        config = json.loads(header)
    except ValueError:
        raise BadRequest(f"the {CONFIG_HEADER} header is not JSON", param=CONFIG_HEADER) from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterProblem(f"adapter {adapter_id!r}: the config is not a PEFT LoRA config", adapter_id, "invalid")
    r, modules = config.get("r"), config.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterProblem(f"adapter {adapter_id!r}: the config's r must be a positive integer", adapter_id,
                             "invalid")
    if not isinstance(modules, list | str) or not modules:
        raise AdapterProblem(f"adapter {adapter_id!r}: the config names no target_modules", adapter_id, "invalid")
    return config


def _check_weights(adapter_id: str, body: bytes) -> None:
    try:
        tensors = deserialize(body)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise AdapterProblem(f"adapter {adapter_id!r} is not a safetensors body: {exc}", adapter_id,
                             "invalid") from None
    if not tensors:
        raise AdapterProblem(f"adapter {adapter_id!r} holds no tensors", adapter_id, "invalid")


def _holder(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise BadRequest("holder must be a string of 1 to 128 characters", param="holder")
    return value


def _ttl(value: Any) -> float:
    try:
        ttl = float(value)
    except (TypeError, ValueError):
        raise BadRequest("ttl_s must be a number of seconds", param="ttl_s") from None
    if not 0 <= ttl < float("inf"):
        raise BadRequest("ttl_s must be a non-negative number of seconds", param="ttl_s")
    return ttl


class Agent:
    def __init__(self, holdings: Holdings, max_body_bytes: int) -> None:
        self.holdings = holdings
        self.max_body_bytes = max_body_bytes
        self._reconciler: asyncio.Task | None = None

    def _answer(self, status: int = 200, **extra: Any) -> Response:
        h = self.holdings
        return JSONResponse({**extra, "adapters": h.listing(), "max_adapters": h.max_adapters,
                             "max_bytes": h.max_bytes, "bytes": h.size}, status_code=status)

    async def put_adapter(self, request: Request) -> Response:
        adapter_id = request.path_params["adapter_id"]
        holder = _holder(request.query_params.get("holder"))
        ttl = _ttl(request.query_params.get("ttl_s", "0"))
        config = peft_config_from(request.headers.get(CONFIG_HEADER), adapter_id)
        try:
            body = await read_body(request, self.max_body_bytes)
        except BodyTooLarge as exc:
            raise AdapterProblem(f"adapter {adapter_id!r}: {exc}", adapter_id, "invalid") from None
        await asyncio.to_thread(_check_weights, adapter_id, body)
        created = await self.holdings.ensure(adapter_id, body, config, holder, ttl)
        return self._answer(201 if created else 200, adapter_id=adapter_id)

    async def delete_adapter(self, request: Request) -> Response:
        holder = request.query_params.get("holder", "")
        await self.holdings.remove(request.path_params["adapter_id"], holder)
        return self._answer()

    async def leases(self, request: Request) -> Response:
        body = parse_json(await read_body(request, 1 << 20))
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        ids = body.get("adapters")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BadRequest("adapters must be a list of adapter ids", param="adapters")
        renewed, missing = self.holdings.renew(_holder(body.get("holder")), _ttl(body.get("ttl_s", 0)), ids)
        return self._answer(renewed=renewed, missing=missing)

    async def adapters(self, request: Request) -> Response:
        return self._answer()

    async def health(self, request: Request) -> Response:
        server_ok = await self.holdings.server.healthy()
        ok = server_ok and self.holdings.reconciled
        return JSONResponse({"ok": ok, self.holdings.server.kind: server_ok, "reconciled": self.holdings.reconciled},
                            status_code=200 if ok else 503)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/adapters", self.adapters, methods=["GET"]),
            Route("/v1/adapters/{adapter_id:path}", self.put_adapter, methods=["PUT"]),
            Route("/v1/adapters/{adapter_id:path}", self.delete_adapter, methods=["DELETE"]),
            Route("/v1/leases", self.leases, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ]

    async def start(self, reconcile_s: float = RECONCILE_S) -> None:
        await asyncio.to_thread(self.holdings.prepare)
        self._reconciler = asyncio.get_running_loop().create_task(self.holdings.run_reconciler(reconcile_s))

    async def close(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        await self.holdings.server.close()


async def _backend_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BackendError)
    return JSONResponse(wire.error_body(exc), status_code=wire.error_status(exc))


def create_agent_app(agent: Agent, tokens: tuple[str, ...], *, reconcile_s: float = RECONCILE_S,
                     on_stopped: Callable[[], None] | None = None) -> ASGIApp:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await agent.start(reconcile_s)
        try:
            yield
        finally:
            try:
                await agent.close()
            finally:
                if on_stopped is not None:
                    on_stopped()

    app = Starlette(routes=agent.routes(), lifespan=lifespan, exception_handlers={BackendError: _backend_error})
    app.state.agent = agent
    return TokenGate(app, tokens, service="agent")
