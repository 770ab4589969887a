"""A store that cannot answer in time is a ``StoreUnavailable``, never a driver's exception.

Redis (the shared registry and the quota buckets) and SQLite (the embedded registry) each fail
in their own way when they are down, frozen, restarting or locked. ``translated`` wraps every
public coroutine method of a store class so that those failures, and only those, become one
``StoreUnavailable`` naming the store; the edge answers it with a 503 and Retry-After, and
anything else (a bug) still surfaces as itself.

``redis_client`` builds the Redis client every store and quota user shares the policy of: a
bounded connect and read timeout (so a frozen server costs at most ``timeout_s`` per call,
not the driver's default of waiting), and exactly one immediate retry on a connection error,
which is what a pooled connection left stale by a Redis restart raises on its first use: the
retry reconnects, so requests succeed as soon as Redis is back. Timeouts are not retried: a
frozen server would only double the wait.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import StoreUnavailable

C = TypeVar("C", bound=type)

REDIS_OUTAGES: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError)
#: SQLite result codes that mean "not now" rather than "wrong": busy or locked by another
#: connection, an I/O error, a full disk, a file that cannot be opened
_SQLITE_OUTAGE_CODES = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN")


def sqlite_outage(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorname", "").startswith(_SQLITE_OUTAGE_CODES)


def translated(store: str, outages: tuple[type[BaseException], ...],
               is_outage: Callable[[BaseException], bool] | None = None) -> Callable[[C], C]:
    """Class decorator: every public ``async def`` raises StoreUnavailable(``store``) instead
    of one of ``outages`` (for which ``is_outage``, when given, holds)."""
    def decorate(cls: C) -> C:
        for name, method in list(vars(cls).items()):
            if not name.startswith("_") and inspect.iscoroutinefunction(method):
                setattr(cls, name, _guarded(method, store, outages, is_outage))
        return cls
    return decorate


def _guarded(method: Callable[..., Any], store: str, outages: tuple[type[BaseException], ...],
             is_outage: Callable[[BaseException], bool] | None) -> Callable[..., Any]:
    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except outages as exc:
            if is_outage is not None and not is_outage(exc):
                raise
            raise StoreUnavailable(store, f"{type(exc).__name__}: {exc}") from exc
    return call


def redis_client(url: str, timeout_s: float, *, decode_responses: bool = False) -> aioredis.Redis:
    return aioredis.from_url(url, decode_responses=decode_responses, socket_timeout=timeout_s,
                             socket_connect_timeout=timeout_s,
                             retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))


