"""The API-key authenticator over a real SQLite store: remembered principals, their expiry,
and what forgets them. The store is changed directly here, as another replica sharing it would."""
from __future__ import annotations

import dataclasses
import time

import pytest

from gateway.auth import Authenticator
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.store import Tenant
from gateway.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
async def store(tmp_path):
    s = SqliteStore(tmp_path / "auth.db")
    await s.init()
    await s.create_tenant(Tenant("acme", "Acme", int(time.time())))
    yield s
    await s.close()


async def bearer(auth: Authenticator, key: str):
    return await auth.authenticate(f"Bearer {key}")


async def test_a_revoked_key_is_refused_once_its_principal_expires(store):
    clock = Clock()
    auth = Authenticator(store, b"k" * 32, cache_ttl_s=1.0, clock=clock)
    key, record = await auth.issue("acme", ("tenant",), "ci")
    assert (await bearer(auth, key)).tenant == "acme"
    await store.revoke_api_key(record.id, int(time.time()))  # by another replica
    clock.now += 0.5
    assert (await bearer(auth, key)).subject == record.id  # still remembered
    clock.now += 0.6
    with pytest.raises(AuthenticationFailed):
        await bearer(auth, key)


async def test_forget_applies_a_change_at_once(store):
    auth = Authenticator(store, b"k" * 32, cache_ttl_s=60.0, clock=Clock())
    key, _ = await auth.issue("acme", ("tenant",), "ci")
    await bearer(auth, key)
    tenant = await store.get_tenant("acme")
    await store.update_tenant(dataclasses.replace(tenant, suspended=True))
    auth.forget()
    with pytest.raises(PermissionDenied):
        await bearer(auth, key)


async def test_zero_ttl_looks_the_key_up_every_time(store):
    auth = Authenticator(store, b"k" * 32, cache_ttl_s=0.0, clock=Clock())
    key, record = await auth.issue("acme", ("tenant",), "ci")
    await bearer(auth, key)
    await store.revoke_api_key(record.id, int(time.time()))
    with pytest.raises(AuthenticationFailed):
        await bearer(auth, key)


async def test_refusals_are_not_remembered(store):
    auth = Authenticator(store, b"k" * 32, cache_ttl_s=60.0, clock=Clock())
    key = "tsk-" + "x" * 43
    with pytest.raises(AuthenticationFailed):
        await bearer(auth, key)
    await auth.issue("acme", ("tenant",), "late", key=key)  # registered by another replica
    assert (await bearer(auth, key)).tenant == "acme"


async def test_the_table_holds_digests_not_keys(store):
    auth = Authenticator(store, b"k" * 32, clock=Clock())
    key, _ = await auth.issue("acme", ("tenant",), "ci")
    await bearer(auth, key)
    assert list(auth._remembered) == [auth.digest(key)]
    assert all(key not in repr(v) for v in auth._remembered.values())
