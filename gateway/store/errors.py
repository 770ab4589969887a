"""Store errors.

Hierarchy::

    StoreError
    ├── AlreadyExists      a record with that identity exists (tenant id, adapter name+version, key id)
    ├── SchemaTooNew       the database was written by a newer version of the gateway
    └── StoreUnavailable   the store did not answer in time (down, frozen, restarting, locked)
"""
from __future__ import annotations


class StoreError(Exception):
    pass


class AlreadyExists(StoreError):
    def __init__(self, kind: str, ident: str) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident!r} already exists")


class SchemaTooNew(StoreError):
    def __init__(self, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(f"store schema version {found} is newer than this gateway supports ({supported})")


class StoreUnavailable(StoreError):
    """``store`` ("registry" or "quotas") could not be reached; ``reason`` is for the log."""

    def __init__(self, store: str, reason: str) -> None:
        self.store = store
        self.reason = reason
        super().__init__(f"the {store} store is unavailable ({reason})")
