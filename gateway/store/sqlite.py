"""SQLite store: one file, the embedded default.

Queries run on the event loop thread: each is a primary-key lookup or a small write on a
local file in WAL mode (tens of microseconds), cheaper than a hop to a worker thread.
A write that finds the file locked by another connection waits ``timeout_s``, then (like a
failing disk) raises ``StoreUnavailable``. The schema is versioned in ``meta``; ``init`` applies forward migrations in one transaction
and refuses a database written by a newer gateway.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from .base import GENESIS, SCHEMA_VERSION, audit_hash
from .errors import AlreadyExists, SchemaTooNew
from .outage import sqlite_outage, translated
from .types import AdapterRecord, ApiKeyRecord, AuditEntry, AuditHead, SigningKeyRecord, Tenant, UsageRow

#: version -> statements taking the schema from version-1 to version
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL, created INTEGER NOT NULL,
                          suspended INTEGER NOT NULL DEFAULT 0, quotas TEXT NOT NULL DEFAULT '{}');
    CREATE TABLE api_keys (id TEXT PRIMARY KEY, tenant TEXT, prefix TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
                           scopes TEXT NOT NULL, name TEXT NOT NULL, created INTEGER NOT NULL, revoked INTEGER);
    CREATE INDEX api_keys_tenant ON api_keys (tenant, id);
    CREATE TABLE signing_keys (tenant TEXT NOT NULL, id TEXT NOT NULL, public TEXT NOT NULL,
                               created INTEGER NOT NULL, revoked INTEGER, PRIMARY KEY (tenant, id));
    CREATE TABLE adapters (tenant TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, blob TEXT NOT NULL,
                           size INTEGER NOT NULL, sha256 TEXT NOT NULL, base_model TEXT NOT NULL,
                           rank INTEGER NOT NULL, alpha REAL NOT NULL, target_modules TEXT NOT NULL,
                           signer TEXT NOT NULL, created INTEGER NOT NULL, PRIMARY KEY (tenant, name));
    CREATE TABLE usage (tenant TEXT NOT NULL, day TEXT NOT NULL, model TEXT NOT NULL, requests INTEGER NOT NULL,
                        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
                        PRIMARY KEY (tenant, day, model));
    CREATE TABLE experts (tenant TEXT PRIMARY KEY, data TEXT NOT NULL);
    CREATE TABLE audit (seq INTEGER PRIMARY KEY, time INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
                        target TEXT NOT NULL, detail TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
    """,
    # tenant incarnations; the audit head ("seq:hash" of the last entry) in meta
    2: """
    ALTER TABLE tenants ADD COLUMN incarnation TEXT NOT NULL DEFAULT '';
    INSERT INTO meta SELECT 'audit_head', seq || ':' || hash FROM audit ORDER BY seq DESC LIMIT 1;
    """,
    # backends drained by an operator
    3: """
    CREATE TABLE drains (backend TEXT PRIMARY KEY, at INTEGER NOT NULL);
    """,
}


def _tenant(row: sqlite3.Row) -> Tenant:
    return Tenant(row["id"], row["name"], row["created"], bool(row["suspended"]), json.loads(row["quotas"]),
                  row["incarnation"])


def _key(row: sqlite3.Row) -> ApiKeyRecord:
    return ApiKeyRecord(row["id"], row["tenant"], row["prefix"], row["digest"], tuple(json.loads(row["scopes"])),
                        row["name"], row["created"], row["revoked"])


def _signing(row: sqlite3.Row) -> SigningKeyRecord:
    return SigningKeyRecord(row["id"], row["tenant"], row["public"], row["created"], row["revoked"])


def _adapter(row: sqlite3.Row) -> AdapterRecord:
    return AdapterRecord(row["tenant"], row["name"], row["version"], row["blob"], row["size"], row["sha256"],
                         row["base_model"], row["rank"], row["alpha"], tuple(json.loads(row["target_modules"])),
                         row["signer"], row["created"])


def _audit(row: sqlite3.Row) -> AuditEntry:
    return AuditEntry(row["seq"], row["time"], row["actor"], row["action"], row["target"], row["detail"],
                      row["prev_hash"], row["hash"])


@translated("registry", (sqlite3.OperationalError,), sqlite_outage)
class SqliteStore:
    def __init__(self, path: str | Path, timeout_s: float = 1.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s  # how long a write waits for another connection's lock
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store not initialised: call init()")
        return self._db

    async def init(self) -> None:
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        found = int(row["value"]) if row else 0
        if found > SCHEMA_VERSION:
            db.close()
            raise SchemaTooNew(found, SCHEMA_VERSION)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, MIGRATIONS[version].split(";")):
                    db.execute(statement)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(version),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                db.close()
                raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def ping(self) -> None:
        self.db.execute("SELECT 1").fetchone()

    async def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()["value"])

    def _insert(self, kind: str, ident: str, sql: str, args: tuple[Any, ...]) -> None:
        try:
            self.db.execute(sql, args)
        except sqlite3.IntegrityError:
            raise AlreadyExists(kind, ident) from None

    # tenants -------------------------------------------------------------------------
    async def create_tenant(self, tenant: Tenant) -> None:
        self._insert("tenant", tenant.id, "INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?)",
                     (tenant.id, tenant.name, tenant.created, int(tenant.suspended), json.dumps(tenant.quotas),
                      tenant.incarnation))

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        row = self.db.execute("SELECT * FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        return _tenant(row) if row else None

    async def list_tenants(self, limit: int = 100, after: str | None = None) -> list[Tenant]:
        rows = self.db.execute("SELECT * FROM tenants WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit))
        return [_tenant(r) for r in rows]

    async def update_tenant(self, tenant: Tenant) -> None:
        self.db.execute("UPDATE tenants SET name = ?, suspended = ?, quotas = ? WHERE id = ?",
                        (tenant.name, int(tenant.suspended), json.dumps(tenant.quotas), tenant.id))

    async def delete_tenant(self, tenant_id: str) -> list[AdapterRecord]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            adapters = [_adapter(r) for r in db.execute("SELECT * FROM adapters WHERE tenant = ? ORDER BY name",
                                                        (tenant_id,))]
            for table, column in (("adapters", "tenant"), ("api_keys", "tenant"), ("signing_keys", "tenant"),
                                  ("usage", "tenant"), ("experts", "tenant"), ("tenants", "id")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (tenant_id,))  # noqa: S608 - fixed names
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return adapters

    # API keys -----------------------------------------------------------------------
    async def add_api_key(self, key: ApiKeyRecord) -> None:
        self._insert("api key", key.id, "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (key.id, key.tenant, key.prefix, key.digest, json.dumps(list(key.scopes)), key.name, key.created,
                      key.revoked))

    async def api_key_by_digest(self, digest: str) -> ApiKeyRecord | None:
        row = self.db.execute("SELECT * FROM api_keys WHERE digest = ?", (digest,)).fetchone()
        return _key(row) if row else None

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        row = self.db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _key(row) if row else None

    async def list_api_keys(self, tenant: str | None, limit: int = 100, after: str | None = None) -> list[ApiKeyRecord]:
        rows = self.db.execute("SELECT * FROM api_keys WHERE tenant IS ? AND id > ? ORDER BY id LIMIT ?",
                               (tenant, after or "", limit))
        return [_key(r) for r in rows]

    async def revoke_api_key(self, key_id: str, at: int) -> ApiKeyRecord | None:
        self.db.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (at, key_id))
        return await self.get_api_key(key_id)

    # signing keys ------------------------------------------------------------------------
    async def add_signing_key(self, key: SigningKeyRecord) -> None:
        self._insert("signing key", key.id, "INSERT INTO signing_keys VALUES (?, ?, ?, ?, ?)",
                     (key.tenant, key.id, key.public, key.created, key.revoked))

    async def list_signing_keys(self, tenant: str, include_revoked: bool = False) -> list[SigningKeyRecord]:
        sql = "SELECT * FROM signing_keys WHERE tenant = ?" + ("" if include_revoked else " AND revoked IS NULL")
        return [_signing(r) for r in self.db.execute(sql + " ORDER BY created, id", (tenant,))]

    async def revoke_signing_key(self, tenant: str, key_id: str, at: int) -> SigningKeyRecord | None:
        self.db.execute("UPDATE signing_keys SET revoked = ? WHERE tenant = ? AND id = ? AND revoked IS NULL",
                        (at, tenant, key_id))
        row = self.db.execute("SELECT * FROM signing_keys WHERE tenant = ? AND id = ?", (tenant, key_id)).fetchone()
        return _signing(row) if row else None

    # adapters ---------------------------------------------------------------------------
    async def add_adapter(self, record: AdapterRecord) -> None:
        r = record
        self._insert("adapter", f"{r.tenant}/{r.name}", "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (r.tenant, r.name, r.version, r.blob, r.size, r.sha256, r.base_model, r.rank, r.alpha,
                      json.dumps(list(r.target_modules)), r.signer, r.created))

    async def get_adapter(self, tenant: str, name: str) -> AdapterRecord | None:
        row = self.db.execute("SELECT * FROM adapters WHERE tenant = ? AND name = ?", (tenant, name)).fetchone()
        return _adapter(row) if row else None

    async def list_adapters(self, tenant: str | None, limit: int = 100, after: str | None = None) -> list[AdapterRecord]:
        if tenant is None:
            rows = self.db.execute("SELECT * FROM adapters WHERE (tenant, name) > (?, ?) ORDER BY tenant, name LIMIT ?",
                                   (*(after or "").partition("/")[::2], limit))
        else:
            rows = self.db.execute("SELECT * FROM adapters WHERE tenant = ? AND name > ? ORDER BY name LIMIT ?",
                                   (tenant, after or "", limit))
        return [_adapter(r) for r in rows]

    async def delete_adapter(self, tenant: str, name: str) -> AdapterRecord | None:
        record = await self.get_adapter(tenant, name)
        if record is not None:
            self.db.execute("DELETE FROM adapters WHERE tenant = ? AND name = ?", (tenant, name))
        return record

    async def count_adapters(self, tenant: str) -> int:
        return self.db.execute("SELECT COUNT(*) AS n FROM adapters WHERE tenant = ?", (tenant,)).fetchone()["n"]

    # usage ------------------------------------------------------------------------------
    async def add_usage(self, tenant: str, day: str, model: str, requests: int, prompt_tokens: int,
                        completion_tokens: int, incarnation: str | None = None) -> bool:
        guard, args = ("true", ()) if incarnation is None else (
            "EXISTS (SELECT 1 FROM tenants WHERE id = ? AND incarnation = ?)", (tenant, incarnation))
        cursor = self.db.execute(
            f"INSERT INTO usage SELECT ?, ?, ?, ?, ?, ? WHERE {guard} ON CONFLICT (tenant, day, model) DO UPDATE SET "  # noqa: S608
            "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens = completion_tokens + excluded.completion_tokens",
            (tenant, day, model, requests, prompt_tokens, completion_tokens, *args))
        return cursor.rowcount > 0

    async def usage(self, tenant: str, since_day: str | None = None) -> list[UsageRow]:
        rows = self.db.execute("SELECT * FROM usage WHERE tenant = ? AND day >= ? ORDER BY day, model",
                               (tenant, since_day or ""))
        return [UsageRow(r["tenant"], r["day"], r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"])
                for r in rows]

    # experts ----------------------------------------------------------------------------
    async def put_experts(self, tenant: str, table: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO experts VALUES (?, ?)", (tenant, json.dumps(table)))

    async def get_experts(self, tenant: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM experts WHERE tenant = ?", (tenant,)).fetchone()
        return json.loads(row["data"]) if row else None

    # audit ------------------------------------------------------------------------------
    async def append_audit(self, time: int, actor: str, action: str, target: str, detail: str) -> AuditEntry:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last["seq"] + 1, last["hash"]) if last else (1, GENESIS)
            digest = audit_hash(prev, seq, time, actor, action, target, detail)
            db.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (seq, time, actor, action, target, detail, prev, digest))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('audit_head', ?)", (f"{seq}:{digest}",))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return AuditEntry(seq, time, actor, action, target, detail, prev, digest)

    async def list_audit(self, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        rows = self.db.execute("SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
        return [_audit(r) for r in rows]

    async def set_drained(self, backend: str, drained: bool, at: int) -> None:
        if drained:
            self.db.execute("INSERT OR REPLACE INTO drains VALUES (?, ?)", (backend, at))
        else:
            self.db.execute("DELETE FROM drains WHERE backend = ?", (backend,))

    async def drained(self) -> dict[str, int]:
        return {r["backend"]: r["at"] for r in self.db.execute("SELECT * FROM drains")}

    async def audit_head(self) -> AuditHead | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
        if row is None:
            return None
        seq, _, digest = row["value"].partition(":")
        return AuditHead(int(seq), digest)
