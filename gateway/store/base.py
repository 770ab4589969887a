"""The registry's one async interface, implemented by SQLite (embedded default) and Redis
(shared by replicas). Both pass tests/gateway/test_store.py (one contract suite).

Every method raises ``StoreUnavailable`` when the store does not answer in time.
Listing methods return records ordered by their identity (tenant id, adapter name, key id,
audit seq) and page with ``limit`` and ``after`` (the identity of the last record seen).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

from .types import AdapterRecord, ApiKeyRecord, AuditEntry, AuditHead, SigningKeyRecord, Tenant, UsageRow

SCHEMA_VERSION = 3
GENESIS = "0" * 64


def audit_hash(prev_hash: str, seq: int, time: int, actor: str, action: str, target: str, detail: str) -> str:
    """SHA-256 over the previous hash and the entry's canonical JSON: editing or deleting any
    entry breaks every later link."""
    body = json.dumps([prev_hash, seq, time, actor, action, target, detail], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def verify_chain(entries: list[AuditEntry], head: AuditHead | None = None) -> list[str]:
    """Problems found in an audit log read from the start (empty = intact). ``head``, when
    given, is the separately stored last seq and hash: it shows entries removed from the end."""
    problems = []
    prev = GENESIS
    for expected_seq, e in enumerate(entries, start=1):
        if e.seq != expected_seq:
            problems.append(f"entry {expected_seq} is missing (found seq {e.seq})")
        if e.prev_hash != prev:
            problems.append(f"entry {e.seq}: previous-hash link broken")
        if audit_hash(e.prev_hash, e.seq, e.time, e.actor, e.action, e.target, e.detail) != e.hash:
            problems.append(f"entry {e.seq}: contents do not match its hash")
        prev = e.hash
        expected_seq = e.seq
    last = entries[-1] if entries else None
    if head is not None and (last is None or head.seq != last.seq):
        ends = f"ends at entry {last.seq}" if last is not None else "is empty"
        problems.append(f"the log {ends} but its head records entry {head.seq}: "
                        + ("entries were removed from its end" if last is None or head.seq > last.seq
                           else "the head was not kept with the log"))
    elif head is not None and last is not None and head.hash != last.hash:
        problems.append(f"entry {last.seq}: does not match the hash its head records")
    return problems


async def verify_store(store: "Store") -> tuple[int, list[str], AuditHead | None]:
    """Read the whole audit log of ``store`` and check it against its head: (entries, problems,
    the head)."""
    head = await store.audit_head()
    entries: list[AuditEntry] = []
    after = 0
    while batch := await store.list_audit(after, 1000):
        entries += batch
        after = batch[-1].seq
    problems = verify_chain(entries, head)
    if head is None and entries:
        problems.append(f"the log has {len(entries)} entries but no head")
    return len(entries), problems, head


class Store(Protocol):
    async def init(self) -> None:
        """Create or migrate the schema (SQLite migrates forward; a newer schema is refused)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Returns when the store answers; StoreUnavailable when it does not in time."""

    async def schema_version(self) -> int: ...

    # tenants -------------------------------------------------------------------------
    async def create_tenant(self, tenant: Tenant) -> None:
        """Raises AlreadyExists."""

    async def get_tenant(self, tenant_id: str) -> Tenant | None: ...

    async def list_tenants(self, limit: int = 100, after: str | None = None) -> list[Tenant]: ...

    async def update_tenant(self, tenant: Tenant) -> None: ...

    async def delete_tenant(self, tenant_id: str) -> list[AdapterRecord]:
        """Remove the tenant and everything it owns (keys, signing keys, adapters, experts,
        usage); returns the adapter records removed (their blobs are the caller's to delete).
        The audit log is kept."""

    # API keys -----------------------------------------------------------------------
    async def add_api_key(self, key: ApiKeyRecord) -> None: ...

    async def api_key_by_digest(self, digest: str) -> ApiKeyRecord | None: ...

    async def list_api_keys(self, tenant: str | None, limit: int = 100, after: str | None = None) -> list[ApiKeyRecord]:
        """Keys of ``tenant`` (None = operator keys)."""

    async def revoke_api_key(self, key_id: str, at: int) -> ApiKeyRecord | None:
        """Marks it revoked (idempotent); None when there is no such key."""

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    # tenant signing keys ------------------------------------------------------------------
    async def add_signing_key(self, key: SigningKeyRecord) -> None: ...

    async def list_signing_keys(self, tenant: str, include_revoked: bool = False) -> list[SigningKeyRecord]: ...

    async def revoke_signing_key(self, tenant: str, key_id: str, at: int) -> SigningKeyRecord | None: ...

    # adapters ---------------------------------------------------------------------------
    async def add_adapter(self, record: AdapterRecord) -> None:
        """Raises AlreadyExists when the tenant already has an adapter of that name."""

    async def get_adapter(self, tenant: str, name: str) -> AdapterRecord | None: ...

    async def list_adapters(self, tenant: str | None, limit: int = 100, after: str | None = None) -> list[AdapterRecord]:
        """Adapters of ``tenant`` (None = every tenant, ordered by tenant then name; ``after``
        is then "tenant/name")."""

    async def delete_adapter(self, tenant: str, name: str) -> AdapterRecord | None: ...

    async def count_adapters(self, tenant: str) -> int: ...

    # usage ------------------------------------------------------------------------------
    async def add_usage(self, tenant: str, day: str, model: str, requests: int, prompt_tokens: int,
                        completion_tokens: int, incarnation: str | None = None) -> bool:
        """Add to the counters; with ``incarnation``, only while the tenant exists as that
        incarnation (False, nothing written, once it was deleted, even if re-created)."""

    async def usage(self, tenant: str, since_day: str | None = None) -> list[UsageRow]: ...

    # expert tables (router) ---------------------------------------------------------------
    async def put_experts(self, tenant: str, table: dict[str, Any]) -> None: ...

    async def get_experts(self, tenant: str) -> dict[str, Any] | None: ...

    # audit log --------------------------------------------------------------------------
    async def append_audit(self, time: int, actor: str, action: str, target: str, detail: str) -> AuditEntry:
        """Appends atomically (sequence and hash chain computed inside the store)."""

    async def list_audit(self, after: int = 0, limit: int = 100) -> list[AuditEntry]: ...

    # backends drained by an operator ------------------------------------------------------
    async def set_drained(self, backend: str, drained: bool, at: int) -> None:
        """``backend`` is ``pool/name``; every gateway replica stops (or resumes) dispatching to it."""

    async def drained(self) -> dict[str, int]:
        """Drained backends and when they were drained."""

    async def audit_head(self) -> AuditHead | None:
        """The last entry's seq and hash as recorded with each append (None: nothing appended)."""
