"""Store outages with a real redis-server killed, frozen and restarted, and a locked SQLite
file: every request gets a 503 with Retry-After in OpenAI's shape within the store timeout,
/health and the metrics say which store is down, /ready stays up, and requests succeed again
as soon as the store is back (stale pooled connections included)."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import httpx
import pytest

from gateway.app import create_app
from tests.redis_server import RedisServer

from .conftest import BASE, settings, validate

ADMIN = "tsk-outage-admin"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]
TIMEOUT_S = 0.5


@pytest.fixture()
def redis_proc():
    server = RedisServer(durable=True)
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def gateway(tmp_path, **overrides):
    app = create_app(settings(tmp_path, admin_key=ADMIN, api_key=None, store_timeout_s=TIMEOUT_S,
                              registry_cache_ttl_s=0, null_tokens=4, **overrides))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
            admin = {"authorization": f"Bearer {ADMIN}"}
            r = await client.post("/admin/tenants", json={"id": "t", "quotas": {"requests_per_min": 100000,
                                                                               "concurrent": 100}}, headers=admin)
            assert r.status_code == 201, r.text
            r = await client.post("/admin/tenants/t/keys", json={"scopes": ["tenant"]}, headers=admin)
            client.headers["authorization"] = f"Bearer {r.json()['key']}"
            yield app.state.gateway, client


async def chat(client, **extra) -> httpx.Response:
    return await client.post(CHAT, json={"model": BASE, "messages": HELLO, **extra})


def assert_unavailable(r: httpx.Response, store: str) -> None:
    assert r.status_code == 503, r.text
    validate(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert error["code"] == "store_unavailable" and error["type"] == "server_error"
    assert store in error["message"]
    assert int(r.headers["retry-after"]) >= 1


async def metric(client, name: str, labels: str) -> float:
    text = (await client.get("/metrics", headers={"authorization": f"Bearer {ADMIN}"})).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not in the metrics")


async def test_killed_redis_is_a_503_then_serves_again_when_back(tmp_path, redis_proc):
    async with gateway(tmp_path, store_url=redis_proc.url, quota_redis_url=redis_proc.url) as (gw, client):
        assert (await chat(client)).status_code == 200
        redis_proc.kill()
        for call in (chat(client), chat(client, stream=True), client.get("/v1/models"),
                     client.get("/v1/adapters"), client.get("/v1/usage"),
                     client.get("/admin/tenants", headers={"authorization": f"Bearer {ADMIN}"})):
            t0 = time.monotonic()
            r = await call
            assert time.monotonic() - t0 < 10 * TIMEOUT_S
            assert_unavailable(r, "registry")
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "degraded", "stores": {"registry": "unavailable", "quotas": "ok"}}
        await gw.store_health.check()
        assert (await client.get("/health")).json()["stores"] == {"registry": "unavailable", "quotas": "unavailable"}
        assert (await client.get("/ready")).status_code == 200  # the replica itself is fine
        assert await metric(client, "tensafe_store_up", 'store="registry"') == 0.0

        redis_proc.start()  # same port, same data
        for _ in range(5):
            assert (await chat(client)).status_code == 200
        await gw.store_health.check()
        assert (await client.get("/health")).json() == {"status": "ok", "stores": {"registry": "ok", "quotas": "ok"}}
        assert await metric(client, "tensafe_store_up", 'store="quotas"') == 1.0


async def test_frozen_redis_is_a_503_within_the_store_timeout(tmp_path, redis_proc):
    async with gateway(tmp_path, store_url=redis_proc.url, quota_redis_url=redis_proc.url) as (gw, client):
        assert (await chat(client)).status_code == 200
        redis_proc.freeze()
        try:
            t0 = time.monotonic()
            r = await chat(client)
            elapsed = time.monotonic() - t0
            assert_unavailable(r, "registry")
            assert elapsed < 6 * TIMEOUT_S, elapsed  # not the driver's default wait
            t0 = time.monotonic()
            assert (await client.get("/health")).status_code == 200
            assert time.monotonic() - t0 < TIMEOUT_S  # a liveness probe never waits on the store
        finally:
            redis_proc.thaw()
        assert (await chat(client)).status_code == 200


async def test_restarted_redis_leaves_no_stale_pooled_connection(tmp_path, redis_proc):
    async with gateway(tmp_path, store_url=redis_proc.url, quota_redis_url=redis_proc.url) as (gw, client):
        rs = await asyncio.gather(*(chat(client) for _ in range(8)))  # several pooled connections
        assert [r.status_code for r in rs] == [200] * 8
        redis_proc.restart()
        rs = await asyncio.gather(*(chat(client) for _ in range(8)))
        assert [r.status_code for r in rs] == [200] * 8, [r.text for r in rs if r.status_code != 200]
        for _ in range(4):
            assert (await chat(client)).status_code == 200


async def test_quota_store_outage_is_a_503_and_streams_in_flight_finish(tmp_path, redis_proc):
    async with gateway(tmp_path, quota_redis_url=redis_proc.url, null_token_delay_s=0.05) as (gw, client):
        async with client.stream("POST", CHAT, json={"model": BASE, "messages": HELLO, "stream": True}) as stream:
            assert stream.status_code == 200
            redis_proc.kill()  # mid-stream: the stream still ends properly; its release is dropped
            body = "".join([part async for part in stream.aiter_text()])
        assert body.endswith("data: [DONE]\n\n")
        assert_unavailable(await chat(client), "quotas")
        assert (await client.get("/v1/models")).status_code == 200  # the registry (SQLite) is fine
        assert (await client.get("/health")).json()["stores"] == {"registry": "ok", "quotas": "unavailable"}
        redis_proc.start()
        assert (await chat(client)).status_code == 200


async def test_locked_sqlite_is_a_503_after_the_store_timeout(tmp_path):
    async with gateway(tmp_path) as (gw, client):
        admin = {"authorization": f"Bearer {ADMIN}"}
        other = sqlite3.connect(gw.store.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        try:
            r = await client.post("/admin/tenants", json={"id": "u"}, headers=admin)
            assert_unavailable(r, "registry")
        finally:
            other.execute("ROLLBACK")
            other.close()
        r = await client.post("/admin/tenants", json={"id": "u"}, headers=admin)
        assert r.status_code == 201, r.text
