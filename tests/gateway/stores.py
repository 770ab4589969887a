"""What the Store suites share: record builders, direct edits of each backend's audit log, and
each backend's fixtures: ``opener`` (a new instance on the same data each call, closed at
teardown), ``store`` (one such instance) and ``tamper``. SQLite is a file in a temporary
directory, Redis the session's real redis-server, flushed per test."""
from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.store import AdapterRecord, ApiKeyRecord, SigningKeyRecord, Store, Tenant, open_store
from gateway.store.redis import RedisStore

Opener = Callable[[], Awaitable[Store]]


def tenant(tid: str, **kw) -> Tenant:
    return Tenant(**{"id": tid, "name": f"Tenant {tid}", "created": 1_700_000_000, **kw})


def api_key(kid: str, tenant_id: str | None, **kw) -> ApiKeyRecord:
    values = {"id": kid, "tenant": tenant_id, "prefix": "tsk-" + kid[-4:], "digest": "d-" + kid,
              "scopes": ("tenant",), "name": f"key {kid}", "created": 1_700_000_100}
    return ApiKeyRecord(**{**values, **kw})


def signing_key(kid: str, tenant_id: str, created: int = 1_700_000_200, **kw) -> SigningKeyRecord:
    return SigningKeyRecord(**{"id": kid, "tenant": tenant_id, "public": json.dumps({"kid": kid}),
                               "created": created, **kw})


def adapter(tenant_id: str, name: str, **kw) -> AdapterRecord:
    values = {"tenant": tenant_id, "name": name, "version": "1.0", "blob": f"{tenant_id}-{name}.tsa", "size": 1234,
              "sha256": "ab" * 32, "base_model": "smollm2-135m-instruct", "rank": 8, "alpha": 16.5,
              "target_modules": ("q_proj", "v_proj"), "signer": "sk-1", "created": 1_700_000_300}
    return AdapterRecord(**{**values, **kw})


async def fill_tenant(store: Store, tid: str) -> None:
    """A tenant with one of everything it can own."""
    await store.create_tenant(tenant(tid))
    await store.add_api_key(api_key(f"key_{tid}", tid))
    await store.add_signing_key(signing_key(f"sk_{tid}", tid))
    await store.add_adapter(adapter(tid, "beta"))
    await store.add_adapter(adapter(tid, "alpha"))
    await store.add_usage(tid, "2024-05-01", "alpha", 1, 10, 20)
    await store.put_experts(tid, {"experts": ["alpha", "beta"]})


@contextlib.asynccontextmanager
async def opening(make: Callable[[], Store]) -> AsyncIterator[Opener]:
    """An opener of stores from ``make``, each initialized when opened and closed on exit."""
    opened: list[Store] = []

    async def open_() -> Store:
        store = make()
        opened.append(store)
        await store.init()
        return store

    try:
        yield open_
    finally:
        for store in opened:
            await store.close()


class OpenedStore:
    @pytest.fixture()
    async def store(self, opener: Opener) -> Store:
        return await opener()


# SQLite --------------------------------------------------------------------------------------
class SqliteTamper:
    def __init__(self, path) -> None:
        self.path = path

    def _run(self, sql: str, args: tuple) -> None:
        db = sqlite3.connect(self.path)
        try:
            with db:
                db.execute(sql, args)
        finally:
            db.close()

    async def edit(self, seq: int, detail: str) -> None:
        self._run("UPDATE audit SET detail = ? WHERE seq = ?", (detail, seq))

    async def delete(self, seq: int) -> None:
        self._run("DELETE FROM audit WHERE seq = ?", (seq,))


class SqliteBackend(OpenedStore):
    @pytest.fixture()
    async def opener(self, tmp_path) -> AsyncIterator[Opener]:
        async with opening(lambda: open_store(f"sqlite:///{tmp_path / 'registry.db'}")) as open_:
            yield open_

    @pytest.fixture()
    def tamper(self, tmp_path) -> SqliteTamper:
        return SqliteTamper(tmp_path / "registry.db")


# Redis ---------------------------------------------------------------------------------------
PREFIX = "test:"


class RedisTamper:
    def __init__(self, client) -> None:
        self.client = client
        self.key = PREFIX + "audit"

    async def edit(self, seq: int, detail: str) -> None:
        [member] = await self.client.zrangebyscore(self.key, seq, seq)
        entry = json.loads(member)
        entry["detail"] = detail
        await self.client.zrem(self.key, member)
        await self.client.zadd(self.key, {json.dumps(entry): seq})

    async def delete(self, seq: int) -> None:
        assert await self.client.zremrangebyscore(self.key, seq, seq) == 1


class RedisBackend(OpenedStore):
    @pytest.fixture()
    async def opener(self, redis_server, redis_client) -> AsyncIterator[Opener]:
        # redis_client has flushed the database
        async with opening(lambda: RedisStore.from_url(redis_server.url, prefix=PREFIX)) as open_:
            yield open_

    @pytest.fixture()
    def tamper(self, redis_client) -> RedisTamper:
        return RedisTamper(redis_client)
