"""The registry: tenants, API keys, signing keys, adapter records, usage, expert tables and
the audit log, behind one async interface (SQLite or Redis), chosen from a registry dict."""
from __future__ import annotations

from collections.abc import Callable

from .base import SCHEMA_VERSION, Store, audit_hash, verify_chain, verify_store
from .errors import AlreadyExists, SchemaTooNew, StoreError, StoreUnavailable
from .types import SCOPES, AdapterRecord, ApiKeyRecord, AuditEntry, AuditHead, SigningKeyRecord, Tenant, UsageRow


def _sqlite(url: str, timeout_s: float) -> Store:
    from .sqlite import SqliteStore

    return SqliteStore(url.removeprefix("sqlite:///").removeprefix("sqlite://"), timeout_s)


def _redis(url: str, timeout_s: float) -> Store:
    from .redis import RedisStore

    return RedisStore.from_url(url, timeout_s=timeout_s)


STORES: dict[str, Callable[[str, float], Store]] = {"sqlite": _sqlite, "redis": _redis, "rediss": _redis}


def open_store(url: str, timeout_s: float = 1.0) -> Store:
    """``sqlite:///path/to/file.db`` or ``redis://host:port/db``; a call that gets no answer
    within ``timeout_s`` raises StoreUnavailable."""
    scheme = url.partition("://")[0]
    try:
        return STORES[scheme](url, timeout_s)
    except KeyError:
        raise ValueError(f"store URL must start with one of {', '.join(s + '://' for s in STORES)}") from None


__all__ = ["SCHEMA_VERSION", "SCOPES", "STORES", "AdapterRecord", "AlreadyExists", "ApiKeyRecord", "AuditEntry",
           "AuditHead", "SchemaTooNew", "SigningKeyRecord", "Store", "StoreError", "StoreUnavailable", "Tenant",
           "UsageRow", "audit_hash", "open_store", "verify_chain", "verify_store"]
