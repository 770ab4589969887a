"""One contract suite for the registry's Store interface (tenants, keys, adapters, usage,
experts, drains, tenant deletion, restarts), run against SQLite and Redis (tests/gateway/stores.py);
the audit log has a suite of its own (test_store_audit.py)."""
from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from gateway.store import (SCHEMA_VERSION, AlreadyExists, AuditHead, SchemaTooNew, Store, Tenant, UsageRow, open_store,
                           verify_store)
from gateway.store.base import GENESIS, audit_hash
from gateway.store.redis import RedisStore
from gateway.store.sqlite import MIGRATIONS, SqliteStore

from .stores import PREFIX, Opener, RedisBackend, SqliteBackend, adapter, api_key, fill_tenant, signing_key, tenant


class StoreContract:
    """Every Store implementation passes these."""

    # schema -------------------------------------------------------------------------------
    async def test_init_records_the_current_schema_version(self, store: Store) -> None:
        assert await store.schema_version() == SCHEMA_VERSION

    async def test_init_twice_is_harmless(self, store: Store) -> None:
        await store.create_tenant(tenant("acme"))
        await store.init()
        assert await store.get_tenant("acme") == tenant("acme")

    # tenants ------------------------------------------------------------------------------
    async def test_tenant_round_trips(self, store: Store) -> None:
        t = tenant("acme", suspended=True, quotas={"rpm": 60, "models": ["a", "b"]})
        await store.create_tenant(t)
        assert await store.get_tenant("acme") == t
        assert await store.get_tenant("other") is None

    async def test_create_existing_tenant_raises_and_keeps_the_first(self, store: Store) -> None:
        await store.create_tenant(tenant("acme"))
        with pytest.raises(AlreadyExists) as caught:
            await store.create_tenant(tenant("acme", name="Impostor"))
        assert (caught.value.kind, caught.value.ident) == ("tenant", "acme")
        assert (await store.get_tenant("acme")).name == "Tenant acme"
        assert [t.id for t in await store.list_tenants()] == ["acme"]

    async def test_list_tenants_orders_by_id_and_pages(self, store: Store) -> None:
        for tid in ["delta", "a-b", "charlie", "a", "bravo"]:
            await store.create_tenant(tenant(tid))
        assert [t.id for t in await store.list_tenants()] == ["a", "a-b", "bravo", "charlie", "delta"]
        assert [t.id for t in await store.list_tenants(limit=2)] == ["a", "a-b"]
        assert [t.id for t in await store.list_tenants(limit=2, after="a-b")] == ["bravo", "charlie"]
        assert [t.id for t in await store.list_tenants(after="bz")] == ["charlie", "delta"]
        assert await store.list_tenants(after="delta") == []

    async def test_update_tenant_replaces_name_suspension_and_quotas_but_not_created(self, store: Store) -> None:
        await store.create_tenant(tenant("acme"))
        await store.update_tenant(Tenant("acme", "Acme Inc", 5, suspended=True, quotas={"rpm": 10}))
        assert await store.get_tenant("acme") == Tenant("acme", "Acme Inc", 1_700_000_000, True, {"rpm": 10})

    async def test_update_of_a_missing_tenant_creates_nothing(self, store: Store) -> None:
        await store.update_tenant(tenant("ghost"))
        assert await store.get_tenant("ghost") is None
        assert await store.list_tenants() == []

    # API keys -----------------------------------------------------------------------------
    async def test_api_key_is_found_by_id_and_digest(self, store: Store) -> None:
        key = api_key("key_1", "acme", scopes=("tenant", "tenant-admin"))
        await store.add_api_key(key)
        assert await store.get_api_key("key_1") == key
        assert await store.api_key_by_digest("d-key_1") == key
        assert await store.api_key_by_digest("d-unknown") is None
        assert await store.get_api_key("key_unknown") is None

    async def test_api_key_with_taken_id_or_digest_raises_and_writes_nothing(self, store: Store) -> None:
        await store.add_api_key(api_key("key_1", "acme"))
        with pytest.raises(AlreadyExists) as caught:
            await store.add_api_key(api_key("key_1", "acme", digest="d-fresh"))
        assert (caught.value.kind, caught.value.ident) == ("api key", "key_1")
        with pytest.raises(AlreadyExists):
            await store.add_api_key(api_key("key_2", "acme", digest="d-key_1"))
        assert await store.api_key_by_digest("d-fresh") is None
        assert await store.get_api_key("key_2") is None
        assert (await store.api_key_by_digest("d-key_1")).id == "key_1"
        assert [k.id for k in await store.list_api_keys("acme")] == ["key_1"]

    async def test_list_api_keys_separates_tenants_and_operator_keys_and_pages(self, store: Store) -> None:
        for kid in ["key_c", "key_a", "key_b"]:
            await store.add_api_key(api_key(kid, "acme"))
        await store.add_api_key(api_key("key_x", "other"))
        await store.add_api_key(api_key("key_op", None, scopes=("admin",)))
        assert [k.id for k in await store.list_api_keys("acme")] == ["key_a", "key_b", "key_c"]
        assert [k.id for k in await store.list_api_keys("acme", limit=1, after="key_a")] == ["key_b"]
        assert [k.id for k in await store.list_api_keys("other")] == ["key_x"]
        assert await store.list_api_keys(None) == [api_key("key_op", None, scopes=("admin",))]
        assert await store.list_api_keys("nobody") == []

    async def test_revoking_an_api_key_is_idempotent_and_visible(self, store: Store) -> None:
        await store.add_api_key(api_key("key_1", "acme"))
        assert (await store.revoke_api_key("key_1", at=100)).revoked == 100
        assert (await store.revoke_api_key("key_1", at=200)).revoked == 100
        assert (await store.api_key_by_digest("d-key_1")).revoked == 100
        assert (await store.list_api_keys("acme"))[0].revoked == 100
        assert await store.revoke_api_key("key_unknown", at=100) is None
        assert await store.get_api_key("key_unknown") is None

    # signing keys -------------------------------------------------------------------------
    async def test_signing_keys_list_by_creation_and_hide_revoked(self, store: Store) -> None:
        await store.add_signing_key(signing_key("sk_b", "acme", created=2))
        await store.add_signing_key(signing_key("sk_a", "acme", created=2))
        await store.add_signing_key(signing_key("sk_old", "acme", created=1))
        await store.add_signing_key(signing_key("sk_other", "other"))
        assert [k.id for k in await store.list_signing_keys("acme")] == ["sk_old", "sk_a", "sk_b"]
        revoked = await store.revoke_signing_key("acme", "sk_a", at=50)
        assert revoked == signing_key("sk_a", "acme", created=2, revoked=50)
        assert (await store.revoke_signing_key("acme", "sk_a", at=60)).revoked == 50
        assert [k.id for k in await store.list_signing_keys("acme")] == ["sk_old", "sk_b"]
        listed = await store.list_signing_keys("acme", include_revoked=True)
        assert [(k.id, k.revoked) for k in listed] == [("sk_old", None), ("sk_a", 50), ("sk_b", None)]
        assert [k.id for k in await store.list_signing_keys("other")] == ["sk_other"]

    async def test_revoking_another_tenants_or_unknown_signing_key_returns_none(self, store: Store) -> None:
        await store.add_signing_key(signing_key("sk_1", "acme"))
        assert await store.revoke_signing_key("other", "sk_1", at=5) is None
        assert await store.revoke_signing_key("acme", "sk_unknown", at=5) is None
        assert (await store.list_signing_keys("acme"))[0].revoked is None
        assert await store.list_signing_keys("other", include_revoked=True) == []

    async def test_signing_key_with_taken_id_raises(self, store: Store) -> None:
        await store.add_signing_key(signing_key("sk_1", "acme"))
        with pytest.raises(AlreadyExists):
            await store.add_signing_key(signing_key("sk_1", "acme", public="{}"))
        assert (await store.list_signing_keys("acme"))[0].public == json.dumps({"kid": "sk_1"})

    # adapters -----------------------------------------------------------------------------
    async def test_adapter_round_trips(self, store: Store) -> None:
        record = adapter("acme", "support", alpha=0.1)
        await store.add_adapter(record)
        got = await store.get_adapter("acme", "support")
        assert got == record
        assert (got.target_modules, got.key) == (("q_proj", "v_proj"), "acme/support@1.0")
        assert await store.get_adapter("acme", "sales") is None
        assert await store.get_adapter("other", "support") is None

    async def test_adapter_name_is_unique_per_tenant_only(self, store: Store) -> None:
        await store.add_adapter(adapter("acme", "support"))
        with pytest.raises(AlreadyExists) as caught:
            await store.add_adapter(adapter("acme", "support", version="2.0"))
        assert (caught.value.kind, caught.value.ident) == ("adapter", "acme/support")
        assert (await store.get_adapter("acme", "support")).version == "1.0"
        await store.add_adapter(adapter("other", "support", version="3.0"))
        assert (await store.get_adapter("other", "support")).version == "3.0"
        assert await store.count_adapters("acme") == 1

    async def test_list_adapters_of_a_tenant_orders_by_name_and_pages(self, store: Store) -> None:
        for name in ["c", "a-1", "b", "a"]:
            await store.add_adapter(adapter("acme", name))
        await store.add_adapter(adapter("acme-2", "z"))
        await store.add_adapter(adapter("acm", "z"))
        assert [a.name for a in await store.list_adapters("acme")] == ["a", "a-1", "b", "c"]
        assert [a.name for a in await store.list_adapters("acme", limit=2, after="a-1")] == ["b", "c"]
        assert await store.list_adapters("acme", after="c") == []
        assert await store.count_adapters("acme") == 4
        assert await store.count_adapters("nobody") == 0

    async def test_list_all_adapters_orders_by_tenant_then_name_and_pages(self, store: Store) -> None:
        # "-" and "." sort below "/": paging must follow (tenant, name), not the joined text
        wanted = [("a", "x"), ("a", "y"), ("a-b", "a"), ("a.c", "m"), ("b", "a")]
        for t, name in reversed(wanted):
            await store.add_adapter(adapter(t, name))
        assert [(a.tenant, a.name) for a in await store.list_adapters(None)] == wanted
        seen, after = [], None
        while page := await store.list_adapters(None, limit=2, after=after):
            seen += [(a.tenant, a.name) for a in page]
            after = f"{page[-1].tenant}/{page[-1].name}"
        assert seen == wanted

    async def test_delete_adapter_returns_it_once(self, store: Store) -> None:
        await store.add_adapter(adapter("acme", "support"))
        await store.add_adapter(adapter("acme", "sales"))
        assert await store.delete_adapter("acme", "support") == adapter("acme", "support")
        assert await store.delete_adapter("acme", "support") is None
        assert await store.get_adapter("acme", "support") is None
        assert [a.name for a in await store.list_adapters(None)] == ["sales"]
        assert await store.count_adapters("acme") == 1
        await store.add_adapter(adapter("acme", "support", version="2.0"))  # the name is free again
        assert (await store.get_adapter("acme", "support")).version == "2.0"

    # usage --------------------------------------------------------------------------------
    async def test_usage_accumulates_per_day_and_model(self, store: Store) -> None:
        await store.add_usage("acme", "2024-05-02", "base", 1, 10, 5)
        await store.add_usage("acme", "2024-05-01", "support", 1, 7, 3)
        await store.add_usage("acme", "2024-05-02", "base", 2, 20, 6)
        await store.add_usage("acme", "2024-05-01", "base", 1, 1, 1)
        await store.add_usage("other", "2024-05-01", "base", 9, 9, 9)
        assert await store.usage("acme") == [
            UsageRow("acme", "2024-05-01", "base", 1, 1, 1),
            UsageRow("acme", "2024-05-01", "support", 1, 7, 3),
            UsageRow("acme", "2024-05-02", "base", 3, 30, 11),
        ]
        assert await store.usage("acme", since_day="2024-05-02") == [UsageRow("acme", "2024-05-02", "base", 3, 30, 11)]
        assert await store.usage("acme", since_day="2024-06-01") == []
        assert await store.usage("nobody") == []

    async def test_usage_of_an_incarnation_is_written_only_while_it_exists(self, store: Store) -> None:
        await store.create_tenant(tenant("acme", incarnation="first"))
        assert (await store.get_tenant("acme")).incarnation == "first"
        assert await store.add_usage("acme", "2024-05-01", "base", 1, 10, 5, "first") is True
        assert await store.add_usage("acme", "2024-05-01", "base", 1, 10, 5, "other") is False
        assert await store.add_usage("ghost", "2024-05-01", "base", 1, 10, 5, "first") is False
        await store.delete_tenant("acme")
        await store.create_tenant(tenant("acme", incarnation="second"))  # the same id, re-created
        assert await store.add_usage("acme", "2024-05-01", "base", 1, 10, 5, "first") is False
        assert await store.usage("acme") == []
        assert await store.add_usage("acme", "2024-05-01", "base", 1, 3, 4, "second") is True
        assert await store.usage("acme") == [UsageRow("acme", "2024-05-01", "base", 1, 3, 4)]
        assert await store.usage("ghost") == []

    async def test_concurrent_usage_increments_are_not_lost(self, store: Store) -> None:
        await asyncio.gather(*(store.add_usage("acme", "2024-05-01", "base", 1, 2, 3) for _ in range(40)))
        assert await store.usage("acme") == [UsageRow("acme", "2024-05-01", "base", 40, 80, 120)]

    # experts ------------------------------------------------------------------------------
    async def test_experts_are_stored_and_replaced(self, store: Store) -> None:
        assert await store.get_experts("acme") is None
        await store.put_experts("acme", {"experts": [{"name": "a", "weight": 0.5}]})
        assert await store.get_experts("acme") == {"experts": [{"name": "a", "weight": 0.5}]}
        await store.put_experts("acme", {"experts": []})
        assert await store.get_experts("acme") == {"experts": []}
        assert await store.get_experts("other") is None

    # drains -------------------------------------------------------------------------------
    async def test_drains_are_set_listed_and_lifted(self, store: Store, opener: Opener) -> None:
        assert await store.drained() == {}
        await store.set_drained("cpu/w1", True, 10)
        await store.set_drained("cpu/w2", True, 11)
        await store.set_drained("cpu/w2", True, 12)  # idempotent: the latest time stays
        await store.set_drained("cpu/w3", False, 13)  # lifting one never set is harmless
        assert await store.drained() == {"cpu/w1": 10, "cpu/w2": 12}
        await store.set_drained("cpu/w1", False, 14)
        assert await (await opener()).drained() == {"cpu/w2": 12}  # another instance (replica) sees it

    # tenant deletion ----------------------------------------------------------------------
    async def test_delete_tenant_removes_everything_it_owns_and_nothing_else(self, store: Store) -> None:
        await fill_tenant(store, "acme")
        await fill_tenant(store, "acme-2")
        await store.add_api_key(api_key("key_op", None))
        await store.append_audit(1, "op", "tenant.create", "acme", "{}")
        removed = await store.delete_tenant("acme")
        assert removed == [adapter("acme", "alpha"), adapter("acme", "beta")]
        assert await store.get_tenant("acme") is None
        assert await store.get_api_key("key_acme") is None
        assert await store.api_key_by_digest("d-key_acme") is None
        assert await store.list_api_keys("acme") == []
        assert await store.list_signing_keys("acme", include_revoked=True) == []
        assert await store.get_adapter("acme", "alpha") is None
        assert await store.list_adapters("acme") == []
        assert await store.count_adapters("acme") == 0
        assert await store.usage("acme") == []
        assert await store.get_experts("acme") is None
        # the neighbour, the operator keys and the audit log are untouched
        assert [t.id for t in await store.list_tenants()] == ["acme-2"]
        assert (await store.api_key_by_digest("d-key_acme-2")).tenant == "acme-2"
        assert [k.id for k in await store.list_signing_keys("acme-2")] == ["sk_acme-2"]
        assert [(a.tenant, a.name) for a in await store.list_adapters(None)] == [("acme-2", "alpha"),
                                                                                  ("acme-2", "beta")]
        assert len(await store.usage("acme-2")) == 1
        assert await store.get_experts("acme-2") == {"experts": ["alpha", "beta"]}
        assert [k.id for k in await store.list_api_keys(None)] == ["key_op"]
        assert [e.target for e in await store.list_audit()] == ["acme"]
        # a deleted tenant's identities can be used again
        await fill_tenant(store, "acme")
        assert await store.count_adapters("acme") == 2

    async def test_delete_unknown_tenant_returns_nothing(self, store: Store) -> None:
        await fill_tenant(store, "acme")
        assert await store.delete_tenant("ghost") == []
        assert await store.count_adapters("acme") == 2

    # persistence --------------------------------------------------------------------------
    async def test_everything_survives_a_restart(self, store: Store, opener: Opener) -> None:
        await fill_tenant(store, "acme")
        await store.revoke_api_key("key_acme", at=7)
        entry = await store.append_audit(1, "op", "tenant.create", "acme", "{}")
        await store.close()
        reopened = await opener()
        assert await reopened.schema_version() == SCHEMA_VERSION
        assert await reopened.get_tenant("acme") == tenant("acme")
        assert (await reopened.api_key_by_digest("d-key_acme")).revoked == 7
        assert [k.id for k in await reopened.list_signing_keys("acme")] == ["sk_acme"]
        assert [a.name for a in await reopened.list_adapters("acme")] == ["alpha", "beta"]
        assert await reopened.usage("acme") == [UsageRow("acme", "2024-05-01", "alpha", 1, 10, 20)]
        assert await reopened.get_experts("acme") == {"experts": ["alpha", "beta"]}
        assert await reopened.list_audit() == [entry]
        assert (await reopened.append_audit(2, "op", "x", "y", "{}")).prev_hash == entry.hash


class TestSqliteStore(SqliteBackend, StoreContract):
    @staticmethod
    def _old_database(path, version: str | None) -> None:
        db = sqlite3.connect(path)
        with db:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            if version is not None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (version,))
        db.close()

    @pytest.mark.parametrize("version", ["0", None])
    async def test_an_older_database_migrates_forward(self, tmp_path, version: str | None) -> None:
        path = tmp_path / "old.db"
        self._old_database(path, version)
        store = SqliteStore(path)
        await store.init()
        try:
            assert await store.schema_version() == SCHEMA_VERSION
            await store.create_tenant(tenant("acme"))
            await store.add_adapter(adapter("acme", "support"))
            assert await store.count_adapters("acme") == 1
        finally:
            await store.close()

    async def test_a_version_1_database_gets_its_audit_head_and_tenant_incarnations(self, tmp_path) -> None:
        path = tmp_path / "v1.db"
        db = sqlite3.connect(path)
        with db:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            for statement in filter(str.strip, MIGRATIONS[1].split(";")):
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
            db.execute("INSERT INTO tenants VALUES ('acme', 'Acme', 5, 0, '{}')")
            prev = GENESIS
            for seq in (1, 2):
                digest = audit_hash(prev, seq, seq, "op", "act", "t", "{}")
                db.execute("INSERT INTO audit VALUES (?, ?, 'op', 'act', 't', '{}', ?, ?)", (seq, seq, prev, digest))
                prev = digest
        db.close()
        store = SqliteStore(path)
        await store.init()
        try:
            assert await store.schema_version() == SCHEMA_VERSION
            assert await store.audit_head() == AuditHead(2, prev)
            assert (await verify_store(store))[:2] == (2, [])
            assert (await store.get_tenant("acme")).incarnation == ""
            assert await store.add_usage("acme", "2024-05-01", "base", 1, 1, 1, "") is True
            assert (await store.append_audit(3, "op", "act", "t", "{}")).prev_hash == prev
            assert (await verify_store(store))[:2] == (3, [])
        finally:
            await store.close()

    async def test_a_newer_database_is_refused(self, tmp_path) -> None:
        path = tmp_path / "new.db"
        self._old_database(path, "99")
        store = SqliteStore(path)
        with pytest.raises(SchemaTooNew) as caught:
            await store.init()
        assert (caught.value.found, caught.value.supported) == (99, SCHEMA_VERSION)
        with pytest.raises(RuntimeError):
            await store.get_tenant("acme")
        await store.close()


class TestRedisStore(RedisBackend, StoreContract):
    async def test_open_store_builds_a_redis_store_from_its_url(self, redis_server, redis_client) -> None:
        store = open_store(redis_server.url)
        try:
            assert isinstance(store, RedisStore)
            await store.init()
            await store.create_tenant(tenant("acme"))
            assert await redis_client.hget("tensafe:meta", "schema_version") == str(SCHEMA_VERSION).encode()
            assert await redis_client.hexists("tensafe:tenants", "acme")
        finally:
            await store.close()

    async def test_a_client_without_decoded_responses_works_too(self, redis_client) -> None:
        store = RedisStore(redis_client, prefix=PREFIX)
        await store.init()
        await fill_tenant(store, "acme")
        assert [a.name for a in await store.list_adapters(None)] == ["alpha", "beta"]
        assert (await store.api_key_by_digest("d-key_acme")).id == "key_acme"
        assert await store.usage("acme") == [UsageRow("acme", "2024-05-01", "alpha", 1, 10, 20)]
        assert [a.name for a in await store.delete_tenant("acme")] == ["alpha", "beta"]
        assert (await store.append_audit(1, "op", "a", "t", "{}")).seq == 1  # redis_client is closed by its fixture

    async def test_prefixes_keep_stores_apart(self, store: Store, redis_client) -> None:
        other = RedisStore(redis_client, prefix="other:")
        await other.init()
        await store.create_tenant(tenant("acme"))
        await store.append_audit(1, "op", "a", "t", "{}")
        assert await other.get_tenant("acme") is None
        assert await other.list_audit() == []
        assert all(k.startswith(b"test:") or k.startswith(b"other:") for k in await redis_client.keys("*"))

    async def test_a_version_1_layout_gets_its_audit_head(self, redis_server, redis_client) -> None:
        await redis_client.hset(PREFIX + "meta", "schema_version", "1")
        await redis_client.hset(PREFIX + "tenants", "acme", json.dumps(
            {"id": "acme", "name": "Acme", "created": 5, "suspended": False, "quotas": {}}))
        prev = GENESIS
        for seq in (1, 2):
            digest = audit_hash(prev, seq, seq, "op", "act", "t", "{}")
            entry = {"seq": seq, "time": seq, "actor": "op", "action": "act", "target": "t", "detail": "{}",
                     "prev_hash": prev, "hash": digest}
            await redis_client.zadd(PREFIX + "audit", {json.dumps(entry): seq})
            prev = digest
        store = RedisStore.from_url(redis_server.url, prefix=PREFIX)
        try:
            await store.init()
            assert await store.schema_version() == SCHEMA_VERSION
            assert await store.audit_head() == AuditHead(2, prev)
            assert (await verify_store(store))[:2] == (2, [])
            assert (await store.get_tenant("acme")).incarnation == ""
            assert await store.add_usage("acme", "2024-05-01", "base", 1, 1, 1, "") is True
            assert await store.usage("acme") == [UsageRow("acme", "2024-05-01", "base", 1, 1, 1)]
        finally:
            await store.close()

    async def test_a_newer_database_is_refused(self, redis_server, redis_client) -> None:
        await redis_client.hset(PREFIX + "meta", "schema_version", "99")
        store = RedisStore.from_url(redis_server.url, prefix=PREFIX)
        try:
            with pytest.raises(SchemaTooNew) as caught:
                await store.init()
            assert (caught.value.found, caught.value.supported) == (99, SCHEMA_VERSION)
        finally:
            await store.close()

    async def test_concurrent_adds_of_one_identity_admit_exactly_one(self, opener: Opener) -> None:
        one, two = await opener(), await opener()
        results = await asyncio.gather(*(s.add_adapter(adapter("acme", "support", version=str(i)))
                                         for i, s in enumerate([one, two] * 10)), return_exceptions=True)
        assert sum(r is None for r in results) == 1
        assert all(isinstance(r, AlreadyExists) for r in results if r is not None)
        assert await one.count_adapters("acme") == 1
        assert len(await two.list_adapters(None)) == 1
