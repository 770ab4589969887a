"""The tenant's key holder over HTTP: the only process that holds the secret key.

``POST /v1/refresh`` and ``POST /v1/decrypt`` take a ``privacy.wire`` bundle (header ``rank``
and ``width``, the server's ciphertexts as blobs); refresh answers a bundle of ciphertexts,
decrypt a bundle whose header has ``shape`` and whose one blob is the deltas as little-endian
float64. ``GET /health`` is open; everything else needs ``Authorization: Bearer <token>`` (one of
the tokens it was started with, compared in constant time, never logged). Errors are JSON
``{"error": {"kind", "message"}}``: 401 for a missing or wrong token, 400 for a body that is not a
well-formed bundle of this context's ciphertexts, 413 past the body limit.
"""
from __future__ import annotations

import hmac
import json
import logging
import threading

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import wire
from .ckks import CkksError, KeyHolder, load_context

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 2**20
MAX_CIPHERTEXTS = 4096
BUNDLE = "application/x-tensafe-he"


def _error(status: int, kind: str, message: str) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge()
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        parts.append(chunk)
    return b"".join(parts)


def create_app(key_holder: KeyHolder, tokens: tuple[str, ...], *, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    if not tokens or not all(tokens):
        raise ValueError("a key holder needs at least one non-empty token")
    accepted = tuple(("Bearer " + t).encode() for t in tokens)
    lock = threading.Lock()  # one request's crypto at a time on the one context

    def locked(fn, *args):
        with lock:
            return fn(*args)

    def authorised(request: Request) -> bool:
        header = request.headers.get("authorization", "").encode()
        ok = False
        for token in accepted:  # every one compared: the time does not tell which came close
            ok |= hmac.compare_digest(header, token)
        return ok

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def handle(request: Request, op: str) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a valid key-holder token is required (Authorization: Bearer <token>)")
        try:
            body = await _body(request, max_body_bytes)
        except _TooLarge:
            return _error(413, "too_large", f"the body is larger than {max_body_bytes} bytes")
        try:
            header, blobs = wire.unpack(body, max_blobs=MAX_CIPHERTEXTS)
            if not blobs:
                raise CkksError("no ciphertexts")
            rank, width = header.get("rank"), header.get("width")
            if op == "refresh":
                out = await run_in_threadpool(locked, key_holder.refresh, blobs, rank, width)
                return Response(wire.pack({}, out), media_type=BUNDLE)
            deltas = await run_in_threadpool(locked, key_holder.decrypt, blobs, rank, width)
            payload = np.ascontiguousarray(deltas, dtype="<f8").tobytes()
            return Response(wire.pack({"shape": list(deltas.shape)}, [payload]), media_type=BUNDLE)
        except (wire.WireError, CkksError) as exc:
            return _error(400, "invalid_request", str(exc))

    async def refresh(request: Request) -> Response:
        return await handle(request, "refresh")

    async def decrypt(request: Request) -> Response:
        return await handle(request, "decrypt")

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/refresh", refresh, methods=["POST"]),
        Route("/v1/decrypt", decrypt, methods=["POST"]),
    ])


def run(secret_context: bytes, tokens: tuple[str, ...], host: str = "127.0.0.1", port: int = 8700,
        log_level: str = "warning") -> None:
    """Serve until interrupted."""
    import uvicorn

    ctx = load_context(secret_context)
    app = create_app(KeyHolder(ctx), tokens)
    log.info("key holder on %s:%d (%d tokens)", host, port, len(tokens))
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def error_message(body: bytes) -> str:
    """The message of a key holder's JSON error body (or the body's start)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")
