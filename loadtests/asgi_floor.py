"""The peer for ``bench_gateway``: the least an ASGI gateway on uvicorn can do for a streaming
chat request. It reads the body, parses the JSON and streams ``max_tokens`` SSE chunks at the
null backend's pace (token i due ``i * delay`` after the request was parsed) after sending
the status and headers at once, the last one together with ``[DONE]`` and the end of the body,
as the gateway does. No auth, validation,
routing, quotas, metrics or logging: what it adds over an in-process call is the cost of
HTTP, uvicorn and a second process on this machine.

  python -m uvicorn loadtests.asgi_floor:app --port 8001   (TENSAFE_FLOOR_DELAY_S=0.005)
"""
from __future__ import annotations

import asyncio
import json
import os

DELAY_S = float(os.environ.get("TENSAFE_FLOOR_DELAY_S", "0.005"))
HEAD = {"type": "http.response.start", "status": 200,
        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]}
CHUNK = b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'


async def read_body(receive) -> bytes:
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = await read_body(receive)
    tokens = int(json.loads(body).get("max_tokens") or 16)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await send(HEAD)  # at once, as the gateway does once a request is admitted
    for i in range(1, tokens + 1):
        await asyncio.sleep(max(0.0, start + i * DELAY_S - loop.time()))
        if i < tokens:
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": CHUNK + b"data: [DONE]\n\n", "more_body": False})
