"""Errors of the tiered adapter cache.

Hierarchy::

    CacheError
    ├── BudgetExceeded      a tier cannot make room: everything evictable is pinned or leased
    ├── AdapterUnavailable  the adapter cannot be served: its fetch or load failed (``reason``)
    ├── AdapterBusy         an explicit offload of an adapter that requests are using
    ├── AdapterPinned       an explicit eviction of a pinned adapter
    └── UnknownAdapter      the source has no such adapter (deleted, never registered)
"""
from __future__ import annotations


class CacheError(Exception):
    pass


class BudgetExceeded(CacheError):
    def __init__(self, tier: str, needed: int, budget: int, pinned: int) -> None:
        self.tier, self.needed, self.budget, self.pinned = tier, needed, budget, pinned
        super().__init__(
            f"{tier} tier cannot fit {needed} bytes: budget {budget} bytes, {pinned} bytes pinned or in use"
        )


class AdapterUnavailable(CacheError):
    def __init__(self, key: str, reason: str) -> None:
        self.key, self.reason = key, reason
        super().__init__(f"adapter {key!r} is unavailable: {reason}")


class UnknownAdapter(CacheError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"adapter {key!r} is not registered")


class AdapterBusy(CacheError):
    def __init__(self, key: str, backend: str, leases: int) -> None:
        self.key, self.backend, self.leases = key, backend, leases
        super().__init__(f"adapter {key!r} is serving {leases} request(s) on backend {backend!r}")


class AdapterPinned(CacheError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"adapter {key!r} is pinned; unpin it first")
