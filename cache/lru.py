"""A byte-budgeted LRU with pinning and per-owner shares.

Entries are charged their size; inserting past the budget evicts the least recently used
unpinned entries, first from the inserting owner's own entries when that owner is above its
share (so one tenant cannot flush everybody else's adapters), then globally. When what is
evictable cannot make room, ``put`` raises ``BudgetExceeded`` instead of exceeding the budget.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import BudgetExceeded

V = TypeVar("V")


@dataclasses.dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    owner: str
    pins: int = 0


class ByteLRU(Generic[V]):
    def __init__(
        self,
        budget: int,
        *,
        owner_share: float = 1.0,
        name: str = "cpu",
        on_evict: Callable[[str, V], None] | None = None,
    ) -> None:
        if budget <= 0 or not (0.0 < owner_share <= 1.0):
            raise ValueError("budget must be > 0 and owner_share in (0, 1]")
        self.budget = budget
        self.owner_limit = int(budget * owner_share)
        self.name = name
        self.on_evict = on_evict
        self._entries: collections.OrderedDict[str, _Entry[V]] = collections.OrderedDict()
        self.used = 0
        self._by_owner: collections.Counter[str] = collections.Counter()
        self.evictions = 0

    # ---- reads --------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> Iterator[str]:
        return iter(list(self._entries))

    def get(self, key: str) -> V | None:
        """Value of ``key`` and mark it most recently used."""
        e = self._entries.get(key)
        if e is None:
            return None
        self._entries.move_to_end(key)
        return e.value

    def peek(self, key: str) -> V | None:
        e = self._entries.get(key)
        return None if e is None else e.value

    def owner_bytes(self, owner: str) -> int:
        return self._by_owner[owner]

    def is_pinned(self, key: str) -> bool:
        e = self._entries.get(key)
        return bool(e and e.pins)

    def size_of(self, key: str) -> int | None:
        e = self._entries.get(key)
        return None if e is None else e.nbytes

    # ---- writes -------------------------------------------------------------------------
    def put(self, key: str, value: V, nbytes: int, owner: str) -> list[str]:
        """Insert (or replace, keeping its pins) ``key``; returns the keys evicted to make room."""
        old = self._entries.get(key)
        pins = old.pins if old is not None else 0
        if old is not None:
            self.remove(key)
        if nbytes > self.owner_limit:
            raise BudgetExceeded(self.name, nbytes, self.owner_limit, 0)
        evicted: list[str] = []
        over_owner = self._by_owner[owner] + nbytes - self.owner_limit
        if over_owner > 0:
            evicted += self._evict(over_owner, lambda e: e.owner == owner)
        over = self.used + nbytes - self.budget
        if over > 0:
            evicted += self._evict(over, lambda e: True)
        self._entries[key] = _Entry(value, nbytes, owner, pins)
        self.used += nbytes
        self._by_owner[owner] += nbytes
        return evicted

    def _evict(self, need: int, eligible: Callable[[_Entry[V]], bool]) -> list[str]:
        victims, freed = [], 0
        for key, e in self._entries.items():  # least recently used first
            if freed >= need:
                break
            if e.pins == 0 and eligible(e):
                victims.append(key)
                freed += e.nbytes
        if freed < need:
            pinned = sum(e.nbytes for e in self._entries.values() if e.pins)
            raise BudgetExceeded(self.name, need, self.budget, pinned)
        for key in victims:
            value = self.remove(key)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(key, value)
        return victims

    def remove(self, key: str) -> V | None:
        e = self._entries.pop(key, None)
        if e is None:
            return None
        self.used -= e.nbytes
        self._by_owner[e.owner] -= e.nbytes
        if self._by_owner[e.owner] <= 0:
            del self._by_owner[e.owner]
        return e.value

    def pin(self, key: str) -> None:
        self._entries[key].pins += 1

    def unpin(self, key: str) -> None:
        e = self._entries.get(key)
        if e is not None and e.pins > 0:
            e.pins -= 1
