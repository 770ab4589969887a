"""Per-tenant quotas: requests and tokens per minute, and concurrent requests.

A tenant has two token buckets and a concurrency count. A bucket's capacity is its per-minute
limit and it refills continuously at limit/60 per second, so a tenant may burst a minute's
allowance at once and then goes on at the steady rate. ``admit`` takes one request, the
request's token estimate (prompt tokens + max_tokens) and one concurrency slot together, or
nothing: a refusal on one limit leaves the others untouched and raises ``RateLimited`` naming
that limit, with a Retry-After in whole seconds (at least 1). The ``Admission`` it returns is
released when the request or stream ends; that frees the slot and refunds the unused part of
the estimate. ``max_tokens``, ``max_adapters`` and ``max_upload_bytes`` are only carried here;
their callers check them.

Two implementations of the ``Quotas`` protocol:

- ``InProcessQuotas``, for one gateway process: plain dicts. There is no ``await`` between
  check and take, so the event loop's single thread makes each admission atomic.
- ``RedisQuotas``, shared by every replica: one Lua script checks and takes all three on the
  server (Redis runs a script atomically) and a second one releases. Time is the server's
  ``TIME``, so the replicas' clocks need not agree. In-flight admissions are a sorted set of
  ids scored by lease expiry (admission time + ``lease_s``) and expired members are dropped
  on each admit, so a replica that dies mid-stream holds its slots for at most ``lease_s``,
  which must therefore exceed the longest request. A bucket hash expires after 61 s idle, by
  when it has refilled, so dropping it loses nothing. A tenant's keys share a hash tag, hence
  one Redis Cluster slot.

Tests inject ``clock`` (seconds, a float) rather than sleeping; for Redis its value is sent to
the scripts as an argument that takes the place of ``TIME``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import redis.asyncio as aioredis

from ..errors import RateLimited
from ..store.outage import REDIS_OUTAGES, translated

log = logging.getLogger("tensafe.gateway")

#: the largest quota: buckets are floats (here and in Redis's Lua), exact up to 2**53
MAX_QUOTA = 2**53
MIN_WEIGHT, MAX_WEIGHT = 0.01, 1000.0
_EPSILON = 1e-9  # float slack, so that refilling in steps reaches whole numbers
_BUCKET_IDLE_MS = 61_000  # a bucket left alone for a minute is full again, as if absent


@dataclasses.dataclass(frozen=True)
class QuotaLimits:
    """One tenant's limits; ``None`` means unlimited."""

    requests_per_min: int | None = None
    tokens_per_min: int | None = None  # prompt + completion tokens
    concurrent: int | None = None  # in-flight requests, streams included
    max_tokens: int | None = None  # cap on one request's max_tokens
    max_adapters: int | None = None
    max_upload_bytes: int | None = None
    #: the tenant's share of a busy backend relative to others (fair queueing); not a limit
    weight: float = 1.0

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not MIN_WEIGHT <= w <= MAX_WEIGHT:
            raise ValueError(f"quota weight must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, not {w!r}"[:160])
        object.__setattr__(self, "weight", float(w))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "weight":
                continue
            if value is not None and (type(value) is not int or not 0 <= value <= MAX_QUOTA):
                shown = repr(value) if len(repr(value)) <= 24 else repr(value)[:12] + "..."
                raise ValueError(f"quota {field.name} must be an integer from 0 to {MAX_QUOTA} or null, not {shown}")

    def to_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)

    @classmethod
    def stored(cls, d: dict[str, Any]) -> QuotaLimits:
        """Limits read back from the registry, never refused: a record written before a check
        existed must not fail every request of its tenant. A number above MAX_QUOTA counts as
        MAX_QUOTA; anything else out of place (an unknown name, a wrong type) is ignored."""
        names = {field.name for field in dataclasses.fields(cls)} - {"weight"}
        weight = d.get("weight", 1.0)
        fits = not isinstance(weight, bool) and isinstance(weight, int | float) and MIN_WEIGHT <= weight <= MAX_WEIGHT
        return cls(**{k: min(v, MAX_QUOTA) for k, v in d.items() if k in names and type(v) is int and v >= 0},
                   weight=weight if fits else 1.0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuotaLimits:
        names = {field.name for field in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ValueError(f"unknown quota {key!r}; known quotas: {', '.join(sorted(names))}")
        return cls(**d)


class Admission:
    """One admitted request: ``release`` it once, when the request or its stream ends."""

    __slots__ = ("tokens", "_release", "_released")

    def __init__(self, tokens: int, release: Callable[[int], Awaitable[None]]) -> None:
        self.tokens = tokens  # the estimate taken from the tokens bucket
        self._release = release
        self._released = False

    async def release(self, used_tokens: int) -> None:
        """Free the concurrency slot and refund ``tokens - used_tokens`` if positive; later calls do nothing."""
        if self._released:
            return
        self._released = True
        await self._release(max(0, self.tokens - used_tokens))


class Quotas(Protocol):
    async def admit(self, tenant: str, limits: QuotaLimits, tokens: int) -> Admission:
        """Raises RateLimited, or StoreUnavailable when shared buckets cannot be reached."""

    async def ping(self) -> None:
        """Returns when the buckets can be reached; StoreUnavailable when they cannot."""

    async def close(self) -> None: ...


async def _nothing_to_release(refund: int) -> None:
    return None


def _check_tokens(tokens: int) -> None:
    if type(tokens) is not int or tokens < 0:
        raise ValueError(f"tokens must be a non-negative integer, not {tokens!r}")


def _wait(need: float, level: float, limit: int) -> int:
    """Whole seconds until a bucket of capacity ``limit`` at ``level`` holds ``need``."""
    if need > limit:
        return 60  # never fits; the message says why
    return max(1, math.ceil((need - level) * 60 / limit))


def _refused(which: str, limits: QuotaLimits, tokens: int, retry_after: int, available: int) -> RateLimited:
    if which == "concurrent":
        message = f"concurrent requests limit of {limits.concurrent} reached"
    elif which == "requests":
        message = f"requests per minute limit of {limits.requests_per_min} reached"
    elif tokens > (limits.tokens_per_min or 0):
        message = f"request of {tokens} tokens exceeds the tokens per minute limit of {limits.tokens_per_min}"
    else:
        message = (f"tokens per minute limit of {limits.tokens_per_min} reached: "
                   f"requested {tokens}, {available} available")
    return RateLimited(message, code="rate_limit_exceeded", retry_after=retry_after)


@dataclasses.dataclass
class _Bucket:
    level: float
    at: float

    def refill(self, limit: int, now: float) -> float:
        self.level = min(limit, self.level + max(0.0, now - self.at) * limit / 60)
        self.at = now
        return self.level


class InProcessQuotas:
    """Quotas for one process; state lives in dicts owned by this object."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}
        self._inflight: dict[str, int] = {}

    def _bucket(self, buckets: dict[str, _Bucket], tenant: str, limit: int, now: float) -> _Bucket:
        bucket = buckets.get(tenant)
        if bucket is None:
            bucket = buckets[tenant] = _Bucket(float(limit), now)
        bucket.refill(limit, now)
        return bucket

    async def admit(self, tenant: str, limits: QuotaLimits, tokens: int) -> Admission:
        _check_tokens(tokens)
        # No await from here to the return: the check and the take are one step.
        now = self._clock()
        inflight = self._inflight.get(tenant, 0)
        if limits.concurrent is not None and inflight >= limits.concurrent:
            raise _refused("concurrent", limits, tokens, 1, 0)
        requests = tokens_bucket = None
        if limits.requests_per_min is not None:
            requests = self._bucket(self._requests, tenant, limits.requests_per_min, now)
            if requests.level + _EPSILON < 1:
                raise _refused("requests", limits, tokens, _wait(1, requests.level, limits.requests_per_min), 0)
        if limits.tokens_per_min is not None:
            tokens_bucket = self._bucket(self._tokens, tenant, limits.tokens_per_min, now)
            if tokens_bucket.level + _EPSILON < tokens:
                level = tokens_bucket.level
                raise _refused("tokens", limits, tokens, _wait(tokens, level, limits.tokens_per_min), int(level))
        if requests is not None:
            requests.level = max(0.0, requests.level - 1)
        if tokens_bucket is not None:
            tokens_bucket.level = max(0.0, tokens_bucket.level - tokens)
        if limits.concurrent is not None:
            self._inflight[tenant] = inflight + 1

        async def release(refund: int) -> None:
            if limits.concurrent is not None:
                left = self._inflight.get(tenant, 1) - 1
                if left > 0:
                    self._inflight[tenant] = left
                else:
                    self._inflight.pop(tenant, None)
            if limits.tokens_per_min is not None and refund > 0:
                bucket = self._bucket(self._tokens, tenant, limits.tokens_per_min, self._clock())
                bucket.level = min(limits.tokens_per_min, bucket.level + refund)

        return Admission(tokens, release)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._requests.clear()
        self._tokens.clear()
        self._inflight.clear()


# KEYS: bucket hash, in-flight sorted set. Limits of -1 mean unlimited. ARGV[1] '' = server TIME.
_LUA_COMMON = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.17g', x) end
local function level(field, limit)
  local v = redis.call('HMGET', KEYS[1], field, field .. '_at')
  local lvl, at = tonumber(v[1]), tonumber(v[2])
  if not lvl then return limit end
  return math.min(limit, lvl + math.max(0, now - at) * limit / 60)
end
"""

# ARGV: now, requests limit, tokens limit, concurrent limit, tokens, member, lease seconds.
_ADMIT = _LUA_COMMON + """
local req_limit, tok_limit, conc_limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, eps = tonumber(ARGV[5]), 1e-9
local function wait(need, lvl, limit)
  if need > limit then return 60 end
  return math.max(1, math.ceil((need - lvl) * 60 / limit))
end
if conc_limit >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now))
  if redis.call('ZCARD', KEYS[2]) >= conc_limit then return {'concurrent', 1, 0} end
end
local r, t
if req_limit >= 0 then
  r = level('r', req_limit)
  if r + eps < 1 then return {'requests', wait(1, r, req_limit), 0} end
end
if tok_limit >= 0 then
  t = level('t', tok_limit)
  if t + eps < tokens then return {'tokens', wait(tokens, t, tok_limit), math.floor(t)} end
end
if r then redis.call('HSET', KEYS[1], 'r', num(math.max(0, r - 1)), 'r_at', num(now)) end
if t then redis.call('HSET', KEYS[1], 't', num(math.max(0, t - tokens)), 't_at', num(now)) end
if r or t then redis.call('PEXPIRE', KEYS[1], %(idle)d) end
if conc_limit >= 0 then
  local lease = tonumber(ARGV[7])
  redis.call('ZADD', KEYS[2], num(now + lease), ARGV[6])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease * 1000) + %(idle)d)
end
return {'ok', 0, 0}
""" % {"idle": _BUCKET_IDLE_MS}

# ARGV: now, tokens limit, refund, member ('' when the admission holds no slot).
_RELEASE = _LUA_COMMON + """
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end
local tok_limit, refund = tonumber(ARGV[2]), tonumber(ARGV[3])
if tok_limit >= 0 and refund > 0 then
  local t = math.min(tok_limit, level('t', tok_limit) + refund)
  redis.call('HSET', KEYS[1], 't', num(t), 't_at', num(now))
  redis.call('PEXPIRE', KEYS[1], %(idle)d)
end
return 0
""" % {"idle": _BUCKET_IDLE_MS}


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit


@translated("quotas", REDIS_OUTAGES)
class RedisQuotas:
    """Quotas shared by every replica through one Redis; the caller owns (and closes) ``client``.

    When Redis cannot be reached, ``admit`` raises StoreUnavailable (the request gets a 503) and
    a release is dropped with a warning: the request has been served, and its concurrency slot
    frees itself when its lease expires."""

    def __init__(self, client: aioredis.Redis, prefix: str = "tensafe:quota:",
                 clock: Callable[[], float] | None = None, lease_s: float = 600.0) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, not {lease_s!r}")
        self._prefix = prefix
        self._clock = clock
        self._lease_s = lease_s
        self._client = client
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)

    def _now(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    def _keys(self, tenant: str) -> list[str]:
        tag = f"{self._prefix}{{{tenant}}}"
        return [f"{tag}:buckets", f"{tag}:inflight"]

    async def admit(self, tenant: str, limits: QuotaLimits, tokens: int) -> Admission:
        _check_tokens(tokens)
        if limits.requests_per_min is None and limits.tokens_per_min is None and limits.concurrent is None:
            return Admission(tokens, _nothing_to_release)
        keys = self._keys(tenant)
        member = secrets.token_hex(8) if limits.concurrent is not None else ""
        verdict, retry_after, available = await self._admit(keys=keys, args=[
            self._now(), _arg(limits.requests_per_min), _arg(limits.tokens_per_min), _arg(limits.concurrent),
            tokens, member, self._lease_s])
        if isinstance(verdict, bytes):
            verdict = verdict.decode()
        if verdict != "ok":
            raise _refused(verdict, limits, tokens, int(retry_after), int(available))

        async def release(refund: int) -> None:
            if member or (limits.tokens_per_min is not None and refund > 0):
                try:
                    await self._release(keys=keys, args=[self._now(), _arg(limits.tokens_per_min), refund, member])
                except REDIS_OUTAGES as exc:
                    log.warning("quota release for tenant %s dropped, Redis unavailable (%s): the slot frees "
                                "itself within %.0f s", tenant, type(exc).__name__, self._lease_s)

        return Admission(tokens, release)

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        """Nothing to free: the client belongs to the caller."""
