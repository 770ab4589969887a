"""The server-sent-events response, and SSE chunks rendered from per-request templates.

Both sit on the hot path: a 16-token stream is 17 sends (the head, then one per token, the
last also carrying ``[DONE]`` and the end of the body), and a burst of 64 streams shares one
event loop. So a request has one guard for all its waits (one disconnect watcher and one
deadline timer), the response is one coroutine (no task group), and a chunk is its request's
fixed JSON prefix and suffix around the one JSON string that changes.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

_text = json.JSONEncoder(ensure_ascii=False).encode  # one JSON string literal


class ClientGone(Exception):
    """The client disconnected."""


class RequestGuard:
    """The two things that end a request's waits early: its client leaving and its deadline
    (``time.monotonic()``). ``async with guard:`` arms both for the block. When one happens
    while armed, the task that entered the block is cancelled and the block ends with
    ClientGone or TimeoutError (the task is uncancelled); when one happens between blocks, the
    next block ends that way at once. One watcher task (reading ``receive``) and one timer serve
    all the request's waits: they start with the first block and end with ``stop()``, so
    clean-up after a block is never interrupted."""

    def __init__(self, receive: Receive, deadline: float) -> None:
        self.receive = receive
        self.deadline = deadline
        self.gone = False
        self.expired = False
        self.task: asyncio.Task | None = None  # the task of the armed block
        self.interrupted = False  # we cancelled that task
        self.watcher: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.stopped = False

    async def __aenter__(self) -> RequestGuard:
        if self.gone:
            raise ClientGone()
        if self.expired or time.monotonic() >= self.deadline:
            self.expired = True
            raise TimeoutError()
        self.task = asyncio.current_task()
        if self.watcher is None and not self.stopped:
            self.watcher = asyncio.ensure_future(self._watch())
            self.timer = asyncio.get_running_loop().call_later(self.deadline - time.monotonic(), self._expire)
        return self

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._interrupt()

    def _expire(self) -> None:
        self.expired = True
        self._interrupt()

    def _interrupt(self) -> None:
        # While armed, the task is suspended inside the block, so the cancellation lands there.
        if self.task is not None and not self.interrupted:
            self.interrupted = True
            self.task.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        task, self.task = self.task, None
        if not self.interrupted:
            return
        self.interrupted = False
        assert task is not None
        task.uncancel()
        if kind is not None and issubclass(kind, asyncio.CancelledError):
            if self.gone:
                raise ClientGone() from None
            raise TimeoutError() from None

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # Drop the watcher before cancelling it: its CancelledError's traceback holds ``self``,
        # and a reference back would make every request leave a garbage cycle (task, exception,
        # frames) for the cyclic collector, whose pauses showed on a burst's tail latency.
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.cancel()


class EventStream(Response):
    """Streams ``events`` (SSE-encoded bytes) until they end, the client leaves (the iterator is
    closed at once, which aborts the generation) or the request's deadline passes: then
    ``on_timeout()`` is sent as the last event. An event that ends with ``final`` is the last
    one and goes out together with the end of the response, in one write. ``guard`` is the
    request's (stopped here); ``on_gone`` runs when the client left before the end;
    ``on_close`` runs last, however the stream ends, even when ``events`` never started."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], *, guard: RequestGuard, on_timeout: Callable[[], bytes],
                 final: bytes | None = None, on_close: Callable[[], Awaitable[object]] | None = None,
                 on_gone: Callable[[], None] | None = None, headers: Mapping[str, str] | None = None) -> None:
        self.events = events
        self.guard = guard
        self.on_gone = on_gone
        self.final = final
        self.on_close = on_close
        self.on_timeout = on_timeout
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            tail = b""
            try:
                async with self.guard:
                    async for event in self.events:
                        if self.final is not None and event.endswith(self.final):
                            tail = event
                            break
                        await send({"type": "http.response.body", "body": event, "more_body": True})
            except TimeoutError:
                tail = self.on_timeout()
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except (ClientGone, OSError):  # nothing more to send (ASGI 2.4 servers raise OSError on send)
            if self.on_gone is not None:
                self.on_gone()
        finally:
            self.guard.stop()
            try:
                await self.events.aclose()  # type: ignore[attr-defined]
            finally:
                if self.on_close is not None:
                    await self.on_close()


class ChunkTemplate:
    """One request's stream chunks: everything but the text and the finish reason is fixed."""

    def __init__(self, kind: str, rid: str, created: int, model: str, with_usage: bool) -> None:
        self.head = ('data: {"id":' + _text(rid) + ',"object":' + _text(kind) + ',"created":' + str(int(created))
                     + ',"model":' + _text(model) + ',"choices":[{"index":0,')
        self.tail = ',"usage":null}\n\n' if with_usage else "}\n\n"

    def chat(self, text: str, first: bool, finish_reason: str | None) -> bytes:
        if first:
            delta = '{"role":"assistant","content":' + _text(text) + "}"
        else:
            delta = '{"content":' + _text(text) + "}" if text else "{}"
        return self._close('"delta":' + delta, finish_reason)

    def completion(self, text: str, finish_reason: str | None) -> bytes:
        return self._close('"text":' + _text(text), finish_reason)

    def _close(self, body: str, finish_reason: str | None) -> bytes:
        reason = "null" if finish_reason is None else '"' + finish_reason + '"'
        return (self.head + body + ',"logprobs":null,"finish_reason":' + reason + "}]" + self.tail).encode()
