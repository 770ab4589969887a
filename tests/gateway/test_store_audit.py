"""The registry's audit log, the same suite on SQLite and Redis: entries are numbered and
hash-chained, the head follows every append, and every kind of tampering is found."""
from __future__ import annotations

import asyncio

from gateway.store import AuditHead, Store, verify_chain, verify_store
from gateway.store.base import GENESIS, audit_hash

from .stores import Opener, RedisBackend, SqliteBackend


class AuditContract:
    """Every Store implementation's audit log passes these."""

    async def test_audit_entries_are_numbered_and_chained(self, store: Store) -> None:
        first = await store.append_audit(10, "op", "tenant.create", "acme", '{"a":1}')
        second = await store.append_audit(11, "key_1", "adapter.add", "acme/support", "{}")
        assert (first.seq, first.prev_hash) == (1, GENESIS)
        assert first.hash == audit_hash(GENESIS, 1, 10, "op", "tenant.create", "acme", '{"a":1}')
        assert (second.seq, second.prev_hash) == (2, first.hash)
        assert await store.list_audit() == [first, second]
        assert verify_chain(await store.list_audit()) == []

    async def test_list_audit_pages_by_seq(self, store: Store) -> None:
        for i in range(5):
            await store.append_audit(i, "op", "act", f"t{i}", "{}")
        assert [e.seq for e in await store.list_audit(limit=2)] == [1, 2]
        assert [e.seq for e in await store.list_audit(after=2, limit=2)] == [3, 4]
        assert [e.seq for e in await store.list_audit(after=4)] == [5]
        assert await store.list_audit(after=5) == []

    async def test_verify_chain_detects_an_edited_entry(self, store: Store, tamper) -> None:
        for i in range(4):
            await store.append_audit(i, "op", "act", "t", "{}")
        await tamper.edit(2, detail='{"forged":true}')
        entries = await store.list_audit()
        assert entries[1].detail == '{"forged":true}'
        assert verify_chain(entries) == ["entry 2: contents do not match its hash"]

    async def test_verify_chain_detects_a_deleted_entry(self, store: Store, tamper) -> None:
        for i in range(4):
            await store.append_audit(i, "op", "act", "t", "{}")
        await tamper.delete(2)
        entries = await store.list_audit()
        assert [e.seq for e in entries] == [1, 3, 4]
        assert "entry 2 is missing (found seq 3)" in verify_chain(entries)
        assert "entry 3: previous-hash link broken" in verify_chain(entries)

    async def test_the_head_follows_every_append(self, store: Store) -> None:
        assert await store.audit_head() is None
        assert await verify_store(store) == (0, [], None)
        for i in range(3):
            entry = await store.append_audit(i, "op", "act", "t", "{}")
            assert await store.audit_head() == AuditHead(entry.seq, entry.hash)
        assert (await verify_store(store))[:2] == (3, [])

    async def test_verify_store_detects_entries_removed_from_the_end(self, store: Store, tamper) -> None:
        for i in range(4):
            await store.append_audit(i, "op", "act", "t", "{}")
        await tamper.delete(4)
        entries = await store.list_audit()
        assert verify_chain(entries) == []  # the chain alone cannot tell
        count, problems, _ = await verify_store(store)
        assert count == 3
        assert problems == ["the log ends at entry 3 but its head records entry 4: entries were removed from its end"]
        for seq in (3, 2, 1):
            await tamper.delete(seq)
        assert (await verify_store(store))[1] == [
            "the log is empty but its head records entry 4: entries were removed from its end"]

    async def test_verify_store_detects_an_edited_last_entry(self, store: Store, tamper) -> None:
        for i in range(2):
            await store.append_audit(i, "op", "act", "t", "{}")
        await tamper.edit(2, detail='{"forged":true}')
        assert "entry 2: contents do not match its hash" in (await verify_store(store))[1]

    async def test_concurrent_appends_get_consecutive_seqs_and_an_intact_chain(self, store: Store) -> None:
        entries = await asyncio.gather(*(store.append_audit(i, "op", "act", f"t{i}", "{}") for i in range(50)))
        assert sorted(e.seq for e in entries) == list(range(1, 51))
        stored = await store.list_audit(limit=100)
        assert [e.seq for e in stored] == list(range(1, 51))
        assert sorted(e.target for e in stored) == sorted(f"t{i}" for i in range(50))
        assert verify_chain(stored) == []
        assert (await verify_store(store))[:2] == (50, [])


class TestSqliteAudit(SqliteBackend, AuditContract):
    pass


class TestRedisAudit(RedisBackend, AuditContract):
    async def test_appends_from_two_instances_share_one_chain(self, opener: Opener) -> None:
        one, two = await opener(), await opener()
        assert one.client is not two.client
        entries = await asyncio.gather(*(s.append_audit(i, f"replica{n}", "act", f"t{i}", "{}")
                                         for i in range(30) for n, s in enumerate((one, two))))
        assert sorted(e.seq for e in entries) == list(range(1, 61))
        stored = await one.list_audit()
        assert [e.seq for e in stored] == list(range(1, 61))
        assert verify_chain(stored) == []
        assert {e.actor for e in stored} == {"replica0", "replica1"}
