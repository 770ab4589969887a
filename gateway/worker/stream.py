"""The answer to ``POST /v1/generate``: newline-delimited JSON chunks, or a refusal.

The status goes out once the backend has produced the first chunk (its acceptance, for the
embedded engine), so a request the backend refuses (overloaded, context too long, adapter
missing) gets a real error status and body. A
watcher reads ``receive`` from the start: when the client disconnects, whether the request is
still queued, prefilling or streaming, the response's task is cancelled where it waits and the
backend's stream is closed, which aborts the generation and frees its slot at once (a
disconnect noticed only at the next write would leave a queued request holding its place).
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..backends.base import BackendChunk
from ..backends.errors import BackendError, BackendUnavailable
from . import wire
from .metrics import Requests

log = logging.getLogger("tensafe.worker")


def refusal(exc: BackendError, status: int | None = None) -> Response:
    body = json.dumps(wire.error_body(exc)).encode()
    return Response(body, status_code=status or wire.error_status(exc), media_type="application/json")


class ChunkStream(Response):
    media_type = wire.NDJSON

    def __init__(self, chunks: AsyncIterator[BackendChunk], *, adapter_id: str | None, requests: Requests) -> None:
        self.chunks = chunks
        self.adapter_id = adapter_id
        self.requests = requests
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache"})
        self._armed = False
        self._gone = False
        self._task: asyncio.Task | None = None

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._armed and self._task is not None:
            self._gone = True
            self._task.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handle = self.requests.enter(self.adapter_id)
        self._task = asyncio.current_task()
        watcher = asyncio.ensure_future(self._watch(receive))
        self._armed = True
        try:
            await self._respond(scope, receive, send, handle)
        except asyncio.CancelledError:
            if not self._gone:
                raise
        except OSError:  # ASGI 2.4 servers report a gone client on send
            pass
        finally:
            # Nothing below can be interrupted: the watcher only acts while armed, and a
            # cancellation it asked for was delivered inside ``_respond``.
            self._armed = False
            if self._gone and self._task is not None:
                self._task.uncancel()
            watcher.cancel()
            self.requests.leave(handle)
            await self.chunks.aclose()  # type: ignore[attr-defined]

    async def _respond(self, scope: Scope, receive: Receive, send: Send, handle: int) -> None:
        try:
            first = await anext(self.chunks)
        except StopAsyncIteration:
            first = None
        except BackendError as exc:
            await refusal(exc)(scope, receive, send)
            return
        if first is None:
            await refusal(BackendUnavailable("the backend ended the stream without a chunk"))(scope, receive, send)
            return
        waiting = first.completion_tokens == 0 and first.finish_reason is None  # an acceptance
        if not waiting:
            self.requests.running(handle)
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": wire.chunk_line(first), "more_body": True})
        tail = b""
        try:
            async for chunk in self.chunks:
                if waiting:
                    waiting = False
                    self.requests.running(handle)
                await send({"type": "http.response.body", "body": wire.chunk_line(chunk), "more_body": True})
        except BackendError as exc:
            log.warning("generation failed after its first chunk: %s", exc)
            tail = wire.error_line(exc)
        await send({"type": "http.response.body", "body": tail, "more_body": False})
