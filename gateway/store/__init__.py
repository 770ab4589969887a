"""The registry: tenants, API keys, signing keys, adapter records, usage, expert tables and
the audit log, behind one async interface (SQLite or Redis), chosen from a registry dict."""
from __future__ import annotations

from collections.abc import Callable

from .base import SCHEMA_VERSION, Store, audit_hash, verify_chain
from .errors import AlreadyExists, SchemaTooNew, StoreError
from .types import SCOPES, AdapterRecord, ApiKeyRecord, AuditEntry, SigningKeyRecord, Tenant, UsageRow


def _sqlite(url: str) -> Store:
    from .sqlite import SqliteStore

    return SqliteStore(url.removeprefix("sqlite:///").removeprefix("sqlite://"))


def _redis(url: str) -> Store:
    from .redis import RedisStore

    return RedisStore.from_url(url)


STORES: dict[str, Callable[[str], Store]] = {"sqlite": _sqlite, "redis": _redis, "rediss": _redis}


def open_store(url: str) -> Store:
    """``sqlite:///path/to/file.db`` or ``redis://host:port/db``."""
    scheme = url.partition("://")[0]
    try:
        return STORES[scheme](url)
    except KeyError:
        raise ValueError(f"store URL must start with one of {', '.join(s + '://' for s in STORES)}") from None


__all__ = ["SCHEMA_VERSION", "SCOPES", "STORES", "AdapterRecord", "AlreadyExists", "ApiKeyRecord", "AuditEntry",
           "SchemaTooNew", "SigningKeyRecord", "Store", "StoreError", "Tenant", "UsageRow", "audit_hash", "open_store",
           "verify_chain"]
