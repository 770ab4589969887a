"""uvicorn's httptools protocol with the connection limits a public endpoint needs.

- **Header timeout** (``header_timeout_s``): uvicorn arms its keep-alive timer only after a
  response, so a connection that is new, or starts another request and stalls mid-headers, would
  be held forever; a few thousand such (slowloris) connections exhaust file descriptors and
  memory. The timer runs from the connection's start, and from the first byte of each later
  request, until the headers are complete; then a request with partial headers gets a 408 and a
  connection that sent nothing is closed (an unasked-for response could be read as the answer
  to the request such a client sends next).
- **Header size** (``max_header_bytes``): llhttp buffers headers without a bound and uvicorn sets
  none for httptools. Bytes received while a request's headers are incomplete are counted (what
  is buffered stays bounded) and a complete header block is measured: an oversized one gets a
  431.
- **Concurrency** (uvicorn's ``limit_concurrency``): once the open connections or the running
  requests reach the limit, a new request gets a 503 with Retry-After, in the API's JSON error
  shape instead of uvicorn's plain text, so clients back off and retry as on any overload.

Every refusal closes the connection. Nothing is ever written into a response still in flight
(a pipelined request stalling behind it): such a connection is just closed.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from . import errors


def _response(error: errors.ApiError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    return body, headers + [(k.encode(), v.encode()) for k, v in error.headers().items()]


def _refusing_app(status: int, error: errors.ApiError) -> ASGI3Application:
    """An ASGI app answering every request with ``error``: runs as the request's app, so
    uvicorn frames the response and discards the request's body as usual."""
    body, headers = _response(error)

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


class GatewayHttpProtocol(HttpToolsProtocol):
    """One connection. The limits are class attributes, set per server by ``configured``."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 32768
    retry_after_s: int = 1

    @classmethod
    def configured(cls, *, header_timeout_s: float, max_header_bytes: int,
                   retry_after_s: int) -> type[GatewayHttpProtocol]:
        """A subclass carrying these limits: uvicorn instantiates the class it is given with
        its own arguments only."""
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s,
                                           "max_header_bytes": max_header_bytes,
                                           "retry_after_s": retry_after_s})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Checked here, so that uvicorn's own plain-text 503 never answers.
        self.max_concurrency, self.limit_concurrency = self.limit_concurrency, None
        self.header_timer: asyncio.TimerHandle | None = None
        self.reading_headers = False
        self.header_bytes = 0
        self.chunk_done_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.chunk_done_bytes = 0
        super().data_received(data)
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # refused, or a WebSocket now
        if self.reading_headers:
            # Less what the chunk gave to earlier (pipelined) requests' headers and bodies.
            self.header_bytes += max(0, len(data) - self.chunk_done_bytes)
            if self.header_bytes > self.max_header_bytes:
                self.refuse(431, self.headers_too_large())
        elif not self.response_in_flight():
            # Bytes that began no request (blank lines) cancelled uvicorn's keep-alive timer.
            self.arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading_headers = True
        self.header_bytes = 0
        self.arm_header_timer()

    def on_body(self, body: bytes) -> None:
        self.chunk_done_bytes += len(body)
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self.reading_headers = False
        self.cancel_header_timer()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        self.chunk_done_bytes += size
        refusal = self.refusal(size)
        if refusal is None:
            super().on_headers_complete()
            return
        app, self.app = self.app, refusal
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def refusal(self, header_size: int) -> ASGI3Application | None:
        """The app answering a request whose headers just completed instead of ours, if any."""
        if header_size > self.max_header_bytes:
            return _refusing_app(431, self.headers_too_large())
        limit = self.max_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            self.logger.warning("Exceeded concurrency limit.")
            return _refusing_app(503, errors.Overloaded(
                "The server is handling too many connections; retry shortly.", retry_after=self.retry_after_s))
        return None

    def headers_too_large(self) -> errors.ApiError:
        return errors.InvalidRequest(f"The request's headers exceed {self.max_header_bytes} bytes.",
                                     code="headers_too_large")

    def response_in_flight(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def arm_header_timer(self) -> None:
        """Starts the clock unless it runs already: a new connection's time covers its first
        request's headers too."""
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self.header_timeout)

    def cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if not self.reading_headers:
            self.transport.close()
            return
        self.refuse(408, errors.InvalidRequest(
            f"The request's headers did not arrive within {self.header_timeout_s:g} seconds.",
            code="header_timeout"))

    def refuse(self, status: int, error: errors.ApiError) -> None:
        """Answers the request being read with ``error`` and closes the connection."""
        if not self.response_in_flight():
            body, headers = _response(error)
            lines = [STATUS_LINE[status]]
            lines += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers + headers]
            self.transport.write(b"".join(lines) + b"\r\n" + body)
        self.transport.close()
