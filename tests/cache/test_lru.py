from __future__ import annotations

import pytest

from cache import BudgetExceeded, ByteLRU


def test_evicts_least_recent_unpinned_first() -> None:
    evicted: list[str] = []
    lru = ByteLRU(30, on_evict=lambda k, v: evicted.append(k))
    for key in "abc":
        lru.put(key, key.upper(), 10, owner="t")
    assert lru.get("a") == "A"  # a is now the most recent
    assert lru.put("d", "D", 10, owner="t") == ["b"]
    assert evicted == ["b"] and set(lru.keys()) == {"a", "c", "d"} and lru.used == 30


def test_pinned_entries_survive_and_full_pinning_raises() -> None:
    lru = ByteLRU(20)
    lru.put("a", 1, 10, owner="t")
    lru.put("b", 2, 10, owner="t")
    lru.pin("a")
    assert lru.put("c", 3, 10, owner="t") == ["b"]
    lru.pin("c")
    with pytest.raises(BudgetExceeded) as info:
        lru.put("d", 4, 10, owner="t")
    assert info.value.budget == 20 and info.value.pinned == 20
    assert set(lru.keys()) == {"a", "c"} and lru.used == 20
    lru.unpin("a")
    assert lru.put("d", 4, 10, owner="t") == ["a"]


def test_owner_over_its_share_evicts_its_own_entries() -> None:
    lru = ByteLRU(100, owner_share=0.5)
    lru.put("quiet-1", 1, 20, owner="quiet")
    for i in range(10):
        lru.put(f"noisy-{i}", i, 10, owner="noisy")
    assert "quiet-1" in lru
    assert lru.owner_bytes("noisy") <= 50
    assert lru.used <= 100


def test_entry_larger_than_a_share_is_refused() -> None:
    lru = ByteLRU(100, owner_share=0.5)
    with pytest.raises(BudgetExceeded):
        lru.put("huge", 0, 60, owner="t")
    assert len(lru) == 0


def test_replacing_a_key_recharges_its_size() -> None:
    lru = ByteLRU(100)
    lru.put("a", 1, 40, owner="t")
    lru.put("a", 2, 10, owner="t")
    assert lru.used == 10 and lru.peek("a") == 2
