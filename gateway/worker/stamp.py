"""The capacity stamp: every answer to an authenticated request carries the worker's capacity
as it was when the answer started (``x-tensafe-capacity``), so the client's snapshot of a
worker follows each of its calls, not only its periodic refresh.

A generation's answer starts with its first chunk, when that request holds its slot; a
refusal's carries the queue that refused it. ``epoch`` (one per process) and ``seq`` let the
client keep the newest of stamps that arrive out of order over several connections.
"""
from __future__ import annotations

import itertools
import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..backends.base import Backend
from ..bearer import AUTHENTICATED
from . import wire


class CapacityStamp:
    def __init__(self, app: ASGIApp, backend: Backend) -> None:
        self.app = app
        self.backend = backend
        self.epoch = os.urandom(8).hex()
        self._seq = itertools.count(1)

    def header(self) -> tuple[bytes, bytes]:
        value = wire.stamp(self.backend.capacity(), self.epoch, next(self._seq))
        return wire.CAPACITY_HEADER.encode(), value.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get(AUTHENTICATED):
            await self.app(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header()]}
            await send(message)

        await self.app(scope, receive, stamped)
