"""The outermost ASGI layer: request ids, the structured access log, and the last-resort error
handler (an unexpected exception becomes an OpenAI-shaped 500 without a traceback; the
traceback goes to the server log only).

Access-log records carry ids, names, status, timings and token counts: never prompts, outputs,
headers or keys.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ApiError

access_log = logging.getLogger("tensafe.access")
log = logging.getLogger("tensafe.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
#: request.state attributes copied into the access log when a handler set them
LOGGED_STATE = ("tenant", "model", "adapter", "expert", "route_method", "pool", "backend", "dispatch", "ttft_ms",
                "itl_ms", "prompt_tokens", "completion_tokens", "finish_reason", "error_code", "ignored_fields")


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, *, access_log_enabled: bool = True,
                 observe: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.app = app
        self.access_log_enabled = access_log_enabled
        self.observe = observe  # metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                text = value.decode("latin-1")
                request_id = text if _REQUEST_ID.match(text) else None
                break
        request_id = request_id or os.urandom(16).hex()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        status = 0
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", scope["method"], scope["path"], request_id)
            if not started:
                error = ApiError("The server had an error while processing your request.", code="internal_error")
                body = json.dumps(error.body()).encode()
                await send_wrapper({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                status = 500
        finally:
            # a handler's "status" is how a response that began as a 200 stream really ended
            # (499: the client left; an error event's status)
            record = {"request_id": request_id, "method": scope["method"], "path": scope["path"],
                      "status": state.get("status") or status or 499,
                      "latency_ms": round((time.perf_counter() - start) * 1000, 3)}
            for key in LOGGED_STATE:
                if state.get(key) is not None:
                    record[key] = state[key]
            if self.observe is not None:
                self.observe(record)
            if self.access_log_enabled and access_log.isEnabledFor(logging.INFO):
                access_log.info(json.dumps(record, separators=(",", ":")))
