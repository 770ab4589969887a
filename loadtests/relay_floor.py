"""The peer for ``bench_remote``: the least a gateway in front of a remote OpenAI server can do.
It reads the body, sends it upstream with one shared httpx client (keep-alive, a pool as large
as the benchmark's concurrency) and relays the response's status and bytes as they arrive. No
auth, parsing, routing, quotas, metrics or logging: what it adds over calling the server
directly is the cost of a second HTTP hop through uvicorn and httpx on this machine.

  TENSAFE_RELAY_UPSTREAM=http://127.0.0.1:8100 python -m uvicorn loadtests.relay_floor:app --port 8002
"""
from __future__ import annotations

import os

import httpx

from .asgi_floor import read_body

UPSTREAM = os.environ.get("TENSAFE_RELAY_UPSTREAM", "http://127.0.0.1:8100")
POOL = int(os.environ.get("TENSAFE_RELAY_POOL", "64"))
_client: httpx.AsyncClient | None = None


async def app(scope, receive, send) -> None:
    global _client
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _client = httpx.AsyncClient(base_url=UPSTREAM, timeout=httpx.Timeout(600, connect=5),
                                            limits=httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL))
                await send({"type": "lifespan.startup.complete"})
            else:
                await _client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = await read_body(receive)
    headers = {"content-type": "application/json"}
    for name, value in scope["headers"]:
        if name in (b"authorization", b"x-request-id"):
            headers[name.decode()] = value.decode()
    request = _client.build_request(scope["method"], scope["path"], content=body, headers=headers)
    upstream = await _client.send(request, stream=True)
    try:
        await send({"type": "http.response.start", "status": upstream.status_code,
                    "headers": [(b"content-type", upstream.headers.get("content-type", "").encode())]})
        async for chunk in upstream.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await upstream.aclose()
