"""Redis store: the registry shared by gateway replicas.

Every record is JSON in a hash field and every Redis key has at most one variable part, the
tenant id, at its end, so no two identities can map to the same key (``{p}`` is the prefix)::

    {p}meta                    hash  schema_version, audit_head ("seq:hash" of the last entry)
    {p}tenants                 hash  tenant id -> Tenant
    {p}tenant-index            zset  tenant ids
    {p}api-keys                hash  key id -> ApiKeyRecord
    {p}api-key-digests         hash  digest -> key id
    {p}api-key-index[:tenant]  zset  key ids of a tenant (no suffix: operator keys)
    {p}signing-keys:tenant     hash  key id -> SigningKeyRecord
    {p}adapters:tenant         hash  adapter name -> AdapterRecord
    {p}adapter-index           zset  "tenant\\0name", so it sorts by tenant then name
    {p}usage:tenant            hash  JSON [day, model, counter] -> count (HINCRBY)
    {p}experts                 hash  tenant id -> expert table
    {p}audit                   zset  audit entries (JSON) scored by seq
    {p}drains                  hash  pool/backend -> when an operator drained it

Every method raises ``StoreUnavailable`` when Redis does not answer in time (see ``outage``).
Sorted sets hold their members at score 0 and page by identity with ZRANGEBYLEX. Inserts run
in one Lua script that writes nothing when an identity (or an API key's digest) is taken;
updates and ``delete_tenant`` are WATCH/MULTI transactions retried on conflict. The audit
hash is SHA-256, which Redis's Lua lacks, so ``append_audit`` computes it here and appends
with a script that refuses when another appender got there first, then retries.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from .base import GENESIS, SCHEMA_VERSION, audit_hash
from .errors import AlreadyExists, SchemaTooNew
from .outage import REDIS_OUTAGES, redis_client, translated
from .types import AdapterRecord, ApiKeyRecord, AuditEntry, AuditHead, SigningKeyRecord, Tenant, UsageRow

R = TypeVar("R")
SEP = "\0"  # between tenant and name in the adapter index: sorts below every character of an id

#: KEYS[1..c]: hashes whose fields must all be free; KEYS[c+1..]: sorted-set indexes.
#: ARGV: c, then a field and value per hash, then a member per index. 0 = taken, nothing written.
_INSERT = """
local c = tonumber(ARGV[1])
for i = 1, c do
  if redis.call('HEXISTS', KEYS[i], ARGV[2 * i]) == 1 then return 0 end
end
for i = 1, c do redis.call('HSET', KEYS[i], ARGV[2 * i], ARGV[2 * i + 1]) end
for i = c + 1, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[c + 1 + i]) end
return 1
"""

#: KEYS[1]: the audit log, KEYS[2]: meta; ARGV[1]: the last seq the caller saw; ARGV[2]: the
#: entry to append; ARGV[3]: the new head.
_APPEND = """
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local seq = last[2] and tonumber(last[2]) or 0
if seq ~= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], seq + 1, ARGV[2])
redis.call('HSET', KEYS[2], 'audit_head', ARGV[3])
return 1
"""

#: KEYS[1]: tenants, KEYS[2]: the tenant's usage; ARGV[1]: tenant id, ARGV[2]: incarnation, then
#: (field, increment) three times. 0 = the tenant is gone or another incarnation, nothing written.
_ADD_USAGE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local incarnation = cjson.decode(raw)['incarnation']
if incarnation == nil or incarnation == cjson.null then incarnation = '' end
if incarnation ~= ARGV[2] then return 0 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _dump(record: Any) -> str:
    return json.dumps(dataclasses.asdict(record), separators=(",", ":"))


def _load(cls: type[R], raw: bytes | str) -> R:
    return _record(cls, json.loads(raw))


def _record(cls: type[R], data: dict[str, Any]) -> R:
    data = dict(data)
    for field in ("scopes", "target_modules"):
        if field in data:
            data[field] = tuple(data[field])
    if "alpha" in data:
        data["alpha"] = float(data["alpha"])
    return cls(**data)


@translated("registry", REDIS_OUTAGES)
class RedisStore:
    def __init__(self, client: aioredis.Redis, prefix: str = "tensafe:") -> None:
        """``client`` may decode responses or not; this store accepts either."""
        self.client = client
        self.prefix = prefix
        self._insert_script = client.register_script(_INSERT)
        self._append_script = client.register_script(_APPEND)
        self._usage_script = client.register_script(_ADD_USAGE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "tensafe:", timeout_s: float = 1.0) -> RedisStore:
        return cls(redis_client(url, timeout_s, decode_responses=True), prefix)

    def _k(self, name: str, tenant: str | None = None) -> str:
        return f"{self.prefix}{name}" if tenant is None else f"{self.prefix}{name}:{tenant}"

    async def init(self) -> None:
        """Records the schema version in a new database, migrates an older one, refuses one
        written by a newer gateway. Version 2 added the audit head (taken from the last entry of
        an older log) and tenant incarnations (a tenant record without one reads as "")."""
        meta = self._k("meta")
        await self.client.hsetnx(meta, "schema_version", SCHEMA_VERSION)
        found = int(await self.client.hget(meta, "schema_version"))
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(found, SCHEMA_VERSION)
        if found < 2:
            last = await self.client.zrange(self._k("audit"), -1, -1, withscores=True)
            if last:
                await self.client.hsetnx(meta, "audit_head", f"{int(last[0][1])}:{json.loads(last[0][0])['hash']}")
        if found < SCHEMA_VERSION:  # version 3 added the drains hash, which needs no migration
            await self.client.hset(meta, "schema_version", SCHEMA_VERSION)

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> None:
        await self.client.ping()

    async def schema_version(self) -> int:
        return int(await self.client.hget(self._k("meta"), "schema_version"))

    async def _insert(self, kind: str, ident: str, claims: list[tuple[str, str, str]],
                      indexes: Sequence[tuple[str, str]] = ()) -> None:
        """Set every (hash, field, value) of ``claims`` and add the (zset, member) ``indexes``,
        all or nothing: AlreadyExists when a claimed field is taken."""
        keys = [h for h, _, _ in claims] + [z for z, _ in indexes]
        args: list[Any] = [len(claims)]
        for _, field, value in claims:
            args += [field, value]
        args += [m for _, m in indexes]
        if not await self._insert_script(keys=keys, args=args):
            raise AlreadyExists(kind, ident)

    async def _update(self, key: str, field: str, change: Callable[[dict[str, Any]], dict[str, Any]]
                      ) -> dict[str, Any] | None:
        """Replace the JSON record at ``key``/``field`` by ``change(record)`` unless it is absent
        (None); retried when another writer touches the hash meanwhile."""
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, field)
                    if raw is None:
                        return None
                    old = json.loads(raw)
                    new = change(old)
                    if new != old:
                        pipe.multi()
                        pipe.hset(key, field, json.dumps(new, separators=(",", ":")))
                        await pipe.execute()
                    return new
                except WatchError:
                    continue

    # tenants -------------------------------------------------------------------------
    async def create_tenant(self, tenant: Tenant) -> None:
        await self._insert("tenant", tenant.id, [(self._k("tenants"), tenant.id, _dump(tenant))],
                           [(self._k("tenant-index"), tenant.id)])

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        raw = await self.client.hget(self._k("tenants"), tenant_id)
        return _load(Tenant, raw) if raw is not None else None

    async def list_tenants(self, limit: int = 100, after: str | None = None) -> list[Tenant]:
        ids = await self._page(self._k("tenant-index"), after, limit)
        return [_load(Tenant, raw) for raw in await self._hmget(self._k("tenants"), ids)]

    async def update_tenant(self, tenant: Tenant) -> None:
        changes = {"name": tenant.name, "suspended": tenant.suspended, "quotas": tenant.quotas}
        await self._update(self._k("tenants"), tenant.id, lambda old: {**old, **changes})

    async def delete_tenant(self, tenant_id: str) -> list[AdapterRecord]:
        t = tenant_id
        adapters_key, key_index = self._k("adapters", t), self._k("api-key-index", t)
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:  # the watched keys change when an adapter or API key is added meanwhile
                    await pipe.watch(adapters_key, key_index)
                    adapters = sorted((_load(AdapterRecord, raw) for raw in (await pipe.hvals(adapters_key))),
                                      key=lambda a: a.name)
                    key_ids = [_text(k) for k in await pipe.zrange(key_index, 0, -1)]
                    keys = [_load(ApiKeyRecord, raw) for raw in await self._hmget(self._k("api-keys"), key_ids, pipe)]
                    pipe.multi()
                    pipe.hdel(self._k("tenants"), t)
                    pipe.zrem(self._k("tenant-index"), t)
                    pipe.zremrangebylex(self._k("adapter-index"), f"[{t}{SEP}", f"({t}\1")
                    if keys:
                        pipe.hdel(self._k("api-keys"), *key_ids)
                        pipe.hdel(self._k("api-key-digests"), *(k.digest for k in keys))
                    pipe.hdel(self._k("experts"), t)
                    pipe.delete(adapters_key, key_index, self._k("signing-keys", t), self._k("usage", t))
                    await pipe.execute()
                    return adapters
                except WatchError:
                    continue

    # listing helpers ----------------------------------------------------------------------
    async def _page(self, index: str, after: str | None, limit: int, low: str = "", high: str = "+") -> list[str]:
        """Members of ``index`` after ``after`` (all prefixed by ``low``), up to ``high``."""
        start = f"({low}{after}" if after is not None else (f"[{low}" if low else "-")
        return [_text(m) for m in await self.client.zrangebylex(index, start, high, 0, limit)]

    async def _hmget(self, key: str, fields: list[str], client: Any = None) -> list[bytes | str]:
        if not fields:
            return []
        return [v for v in await (client or self.client).hmget(key, fields) if v is not None]

    # API keys -----------------------------------------------------------------------
    async def add_api_key(self, key: ApiKeyRecord) -> None:
        await self._insert("api key", key.id, [(self._k("api-keys"), key.id, _dump(key)),
                                               (self._k("api-key-digests"), key.digest, key.id)],
                           [(self._k("api-key-index", key.tenant), key.id)])

    async def api_key_by_digest(self, digest: str) -> ApiKeyRecord | None:
        key_id = await self.client.hget(self._k("api-key-digests"), digest)
        return await self.get_api_key(_text(key_id)) if key_id is not None else None

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        raw = await self.client.hget(self._k("api-keys"), key_id)
        return _load(ApiKeyRecord, raw) if raw is not None else None

    async def list_api_keys(self, tenant: str | None, limit: int = 100, after: str | None = None) -> list[ApiKeyRecord]:
        ids = await self._page(self._k("api-key-index", tenant), after, limit)
        return [_load(ApiKeyRecord, raw) for raw in await self._hmget(self._k("api-keys"), ids)]

    async def revoke_api_key(self, key_id: str, at: int) -> ApiKeyRecord | None:
        data = await self._update(self._k("api-keys"), key_id,
                                  lambda old: old if old["revoked"] is not None else {**old, "revoked": at})
        return _record(ApiKeyRecord, data) if data is not None else None

    # signing keys ------------------------------------------------------------------------
    async def add_signing_key(self, key: SigningKeyRecord) -> None:
        await self._insert("signing key", key.id, [(self._k("signing-keys", key.tenant), key.id, _dump(key))])

    async def list_signing_keys(self, tenant: str, include_revoked: bool = False) -> list[SigningKeyRecord]:
        keys = [_load(SigningKeyRecord, raw) for raw in await self.client.hvals(self._k("signing-keys", tenant))]
        return sorted((k for k in keys if include_revoked or k.revoked is None), key=lambda k: (k.created, k.id))

    async def revoke_signing_key(self, tenant: str, key_id: str, at: int) -> SigningKeyRecord | None:
        data = await self._update(self._k("signing-keys", tenant), key_id,
                                  lambda old: old if old["revoked"] is not None else {**old, "revoked": at})
        return _record(SigningKeyRecord, data) if data is not None else None

    # adapters ---------------------------------------------------------------------------
    async def add_adapter(self, record: AdapterRecord) -> None:
        await self._insert("adapter", f"{record.tenant}/{record.name}",
                           [(self._k("adapters", record.tenant), record.name, _dump(record))],
                           [(self._k("adapter-index"), f"{record.tenant}{SEP}{record.name}")])

    async def get_adapter(self, tenant: str, name: str) -> AdapterRecord | None:
        raw = await self.client.hget(self._k("adapters", tenant), name)
        return _load(AdapterRecord, raw) if raw is not None else None

    async def list_adapters(self, tenant: str | None, limit: int = 100, after: str | None = None) -> list[AdapterRecord]:
        index = self._k("adapter-index")
        if tenant is not None:
            names = await self._page(index, after, limit, f"{tenant}{SEP}", f"({tenant}\1")
            members = [(tenant, m.partition(SEP)[2]) for m in names]
        else:
            start = None if after is None else after.replace("/", SEP, 1)  # tenant ids hold no "/"
            members = [tuple(m.split(SEP, 1)) for m in await self._page(index, start, limit)]
        async with self.client.pipeline(transaction=False) as pipe:
            for t, name in members:
                pipe.hget(self._k("adapters", t), name)
            raws = await pipe.execute()
        return [_load(AdapterRecord, raw) for raw in raws if raw is not None]

    async def delete_adapter(self, tenant: str, name: str) -> AdapterRecord | None:
        key = self._k("adapters", tenant)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(key, name)
            pipe.hdel(key, name)
            pipe.zrem(self._k("adapter-index"), f"{tenant}{SEP}{name}")
            raw, _, _ = await pipe.execute()
        return _load(AdapterRecord, raw) if raw is not None else None

    async def count_adapters(self, tenant: str) -> int:
        return await self.client.hlen(self._k("adapters", tenant))

    # usage ------------------------------------------------------------------------------
    async def add_usage(self, tenant: str, day: str, model: str, requests: int, prompt_tokens: int,
                        completion_tokens: int, incarnation: str | None = None) -> bool:
        key = self._k("usage", tenant)
        counts = (("requests", requests), ("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens))
        if incarnation is not None:
            args: list[Any] = [tenant, incarnation]
            for counter, n in counts:
                args += [json.dumps([day, model, counter]), n]
            return bool(await self._usage_script(keys=[self._k("tenants"), key], args=args))
        async with self.client.pipeline(transaction=True) as pipe:
            for counter, n in counts:
                pipe.hincrby(key, json.dumps([day, model, counter]), n)
            await pipe.execute()
        return True

    async def usage(self, tenant: str, since_day: str | None = None) -> list[UsageRow]:
        rows: dict[tuple[str, str], dict[str, int]] = {}
        for field, value in (await self.client.hgetall(self._k("usage", tenant))).items():
            day, model, counter = json.loads(field)
            if day >= (since_day or ""):
                rows.setdefault((day, model), {})[counter] = int(value)
        return [UsageRow(tenant, day, model, **counts) for (day, model), counts in sorted(rows.items())]

    # experts ----------------------------------------------------------------------------
    async def put_experts(self, tenant: str, table: dict[str, Any]) -> None:
        await self.client.hset(self._k("experts"), tenant, json.dumps(table))

    async def get_experts(self, tenant: str) -> dict[str, Any] | None:
        raw = await self.client.hget(self._k("experts"), tenant)
        return json.loads(raw) if raw is not None else None

    # audit ------------------------------------------------------------------------------
    async def append_audit(self, time: int, actor: str, action: str, target: str, detail: str) -> AuditEntry:
        key = self._k("audit")
        while True:
            last = await self.client.zrange(key, -1, -1, withscores=True)
            seq, prev = (int(last[0][1]), json.loads(last[0][0])["hash"]) if last else (0, GENESIS)
            entry = AuditEntry(seq + 1, time, actor, action, target, detail, prev,
                               audit_hash(prev, seq + 1, time, actor, action, target, detail))
            if await self._append_script(keys=[key, self._k("meta")], args=[seq, _dump(entry),
                                                                             f"{entry.seq}:{entry.hash}"]):
                return entry

    async def list_audit(self, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        members = await self.client.zrangebyscore(self._k("audit"), f"({after}", "+inf", 0, limit)
        return [_load(AuditEntry, m) for m in members]

    async def set_drained(self, backend: str, drained: bool, at: int) -> None:
        if drained:
            await self.client.hset(self._k("drains"), backend, at)
        else:
            await self.client.hdel(self._k("drains"), backend)

    async def drained(self) -> dict[str, int]:
        return {_text(k): int(v) for k, v in (await self.client.hgetall(self._k("drains"))).items()}

    async def audit_head(self) -> AuditHead | None:
        raw = await self.client.hget(self._k("meta"), "audit_head")
        if raw is None:
            return None
        seq, _, digest = _text(raw).partition(":")
        return AuditHead(int(seq), digest)
