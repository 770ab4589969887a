"""Registry reads remembered on the request path for a short time.

A busy API key or adapter would otherwise cost a registry read (SQLite, or a Redis round trip
when replicas share the store) on every request. Entries expire after ``ttl_s``; ``clear``
drops them all at once when this process changes the registry. A read that overlapped a
``clear`` is not remembered (``token`` before the read, ``put`` after it), so a change is
never undone by a slow read that started before it. Only what was found is remembered:
callers never ``put`` a miss or a refusal.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Remembered(Generic[K, V]):
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self.max_entries = max_entries  # past this many the table is emptied
        self._entries: dict[K, tuple[float, V]] = {}
        self._generation = 0

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] > self._clock():
            return entry[1]
        del self._entries[key]
        return None

    def token(self) -> int:
        return self._generation

    def put(self, key: K, value: V, token: int, ttl_s: float | None = None) -> None:
        """Remember ``value`` for ``ttl_s`` (at most the table's) unless a clear came after ``token``."""
        ttl = self.ttl_s if ttl_s is None else min(self.ttl_s, ttl_s)
        if ttl <= 0 or token != self._generation:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (self._clock() + ttl, value)

    def clear(self) -> None:
        self._entries.clear()
        self._generation += 1

    def keys(self) -> list[K]:
        return list(self._entries)
