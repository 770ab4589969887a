"""Registry reads remembered on the request path, over a real SQLite store: API-key
principals and adapter routes, their expiry, and what forgets them. The store is changed
directly here, as another replica sharing it would."""
from __future__ import annotations

import dataclasses
import time

import pytest

from gateway.tenancy.auth import Authenticator, Principal
from gateway.errors import AuthenticationFailed, ModelNotFound, PermissionDenied
from gateway.serving.names import ModelNames
from gateway.store import AdapterRecord, Tenant
from gateway.tenancy.remembered import Remembered
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


@pytest.mark.parametrize("how", ["forget", "zero ttl"])
async def test_a_suspension_applies_at_once_after_forget_or_without_remembering(store, how):
    auth = Authenticator(store, b"k" * 32, cache_ttl_s=60.0 if how == "forget" else 0.0, clock=Clock())
    key, _ = await auth.issue("acme", ("tenant",), "ci")
    await bearer(auth, key)
    tenant = await store.get_tenant("acme")
    await store.update_tenant(dataclasses.replace(tenant, suspended=True))
    if how == "forget":
        auth.forget()
    with pytest.raises(PermissionDenied):
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
    assert auth._remembered.keys() == [auth.digest(key)]
    assert key not in repr(auth._remembered.get(auth.digest(key)))


def test_remembered_entries_expire_and_a_read_overlapping_a_clear_is_dropped():
    clock = Clock()
    table: Remembered[str, int] = Remembered(1.0, clock)
    table.put("a", 1, table.token())
    assert table.get("a") == 1
    clock.now += 1.0
    assert table.get("a") is None and table.keys() == []  # expired, and dropped
    token = table.token()  # a read starts ...
    table.clear()  # ... a change lands meanwhile ...
    table.put("b", 2, token)  # ... and the read's result is not remembered
    assert table.get("b") is None
    table.put("b", 3, table.token())
    assert table.get("b") == 3


def test_remembered_is_bounded_and_off_at_zero_ttl():
    table: Remembered[int, int] = Remembered(60.0, Clock(), max_entries=3)
    for i in range(3):
        table.put(i, i, table.token())
    assert table.keys() == [0, 1, 2]
    table.put(3, 3, table.token())  # full: emptied, then the new entry
    assert table.keys() == [3]
    off: Remembered[int, int] = Remembered(0.0, Clock())
    off.put(1, 1, off.token())
    assert off.get(1) is None


async def test_an_adapter_route_is_remembered_until_it_expires(store):
    clock = Clock()
    models = ModelNames("base", 1, store, cache_ttl_s=1.0, clock=clock)
    principal = Principal("acme", ("tenant",), "k")
    with pytest.raises(ModelNotFound):  # misses are not remembered ...
        await models.resolve("bot", principal)
    record = AdapterRecord("acme", "bot", "1", "blob", 1, "ab" * 32, "base", 4, 8.0, ("q_proj",), "sk", 1)
    await store.add_adapter(record)
    route = await models.resolve("bot", principal)  # ... so an upload is visible at once
    assert route.adapter_id == record.key and route.tenant_adapter
    await store.delete_adapter("acme", "bot")  # by another replica
    assert (await models.resolve("bot", principal)) == route
    clock.now += 1.0
    with pytest.raises(ModelNotFound):
        await models.resolve("bot", principal)
    with pytest.raises(ModelNotFound):  # another tenant never sees it
        await models.resolve("bot", Principal("other", ("tenant",), "k2"))


async def test_a_verified_jwt_is_remembered_but_never_past_its_expiry(store):
    from tests.gateway.test_oidc import NOW, Keys, sign, verifier
    from tests.gateway.test_oidc import Clock as WallClock

    wall, mono = WallClock(NOW), Clock()
    auth = Authenticator(store, b"k" * 32, oidc=verifier(Keys.rsa, clock=wall), cache_ttl_s=60.0, clock=mono)
    token = sign(Keys.rsa, exp=NOW + 10, tenant="acme")
    principal = await bearer(auth, token)
    assert (principal.tenant, principal.subject) == ("acme", "oidc:user-1")
    assert auth._remembered.keys() == [auth.digest(token)]  # by digest, as API keys
    tenant = await store.get_tenant("acme")
    await store.update_tenant(dataclasses.replace(tenant, suspended=True))  # by another replica
    wall.advance(9)
    mono.now += 9
    assert (await bearer(auth, token)) == principal  # remembered: no signature check, no tenant read
    wall.advance(2)
    mono.now += 2  # past exp (within the verifier's leeway): verified again, and the suspension shows
    with pytest.raises(PermissionDenied):
        await bearer(auth, token)
