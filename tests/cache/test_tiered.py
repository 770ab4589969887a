"""The tiered cache on real TSSP packages and a real engine's adapter slots."""
from __future__ import annotations

import asyncio
import os

import pytest

from cache import AdapterBusy, AdapterCache, AdapterUnavailable, BudgetExceeded, State, Tier, UnknownAdapter
from cache.tssp import PackageRef
from engine import AdapterConfig, StackedLora
from gateway.backends.null import NullBackend
from gateway.serving.slots import BackendSlots

from .conftest import ADAPTER_BYTES


async def test_cold_fetch_then_cpu_hit(cache: AdapterCache) -> None:
    assert cache.status("a/ad0").state is State.ON_DISK
    first = await cache.fetch("a/ad0")
    again = await cache.fetch("a/ad0")
    assert again is first
    assert first.nbytes == ADAPTER_BYTES and first.lora.rank == 4
    st = cache.status("a/ad0")
    assert st.state is State.IN_CPU and st.tiers == (Tier.DISK, Tier.CPU)
    assert cache.counters.fetches == 1 and cache.counters.cpu_hits == 1 and cache.counters.cpu_misses == 1


async def test_hundred_concurrent_requests_share_one_fetch_and_one_load(cache: AdapterCache, slots, registry) -> None:
    async def request() -> None:
        async with cache.lease("a/ad1", "embedded"):
            await asyncio.sleep(0)

    await asyncio.gather(*(request() for _ in range(100)))
    assert cache.counters.fetches == 1
    assert cache.counters.loads == 1 and registry.lookups == 1
    assert cache.status("a/ad1").backends == ("embedded",)


async def test_full_slots_offload_least_recent_unleased(cache: AdapterCache, slots) -> None:
    await cache.load("a/ad0", "embedded")
    await cache.load("a/ad1", "embedded")
    await cache.load("a/ad0", "embedded")  # touch: ad1 is now least recent
    await cache.load("a/ad2", "embedded")
    assert slots.resident() == {"a/ad0", "a/ad2"}
    assert cache.status("a/ad1").tiers == (Tier.DISK, Tier.CPU)  # offloaded, still warm in RAM
    assert cache.counters.offloads == 1


async def test_leased_adapters_stay_and_a_load_waits_for_a_free_slot(cache: AdapterCache, slots) -> None:
    release = asyncio.Event()

    async def hold(key: str) -> None:
        async with cache.lease(key, "embedded"):
            await release.wait()

    holders = [asyncio.create_task(hold("a/ad0")), asyncio.create_task(hold("a/ad1"))]
    while cache.stats()["device"]["embedded"]["leased"] < 2:
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(cache.load("a/ad2", "embedded"))
    await asyncio.sleep(0.2)
    assert not waiting.done() and slots.resident() == {"a/ad0", "a/ad1"}
    with pytest.raises(AdapterBusy):
        await cache.offload("a/ad0", "embedded")
    release.set()
    await asyncio.gather(*holders)
    await asyncio.wait_for(waiting, 10)
    assert "a/ad2" in slots.resident()


async def test_verbs_are_idempotent(cache: AdapterCache, slots) -> None:
    await cache.load("a/ad0", "embedded")
    await cache.load("a/ad0", "embedded")
    await cache.offload("a/ad0", "embedded")
    await cache.offload("a/ad0", "embedded")
    assert slots.resident() == set() and cache.status("a/ad0").state is State.IN_CPU
    cache.evict("a/ad0")
    cache.evict("a/ad0")
    assert cache.status("a/ad0").state is State.ON_DISK
    await cache.load("a/ad0", "embedded")  # warm path gone: a cold fetch again
    assert cache.counters.fetches == 2 and cache.counters.loads == 2


async def test_cpu_budget_evicts_in_lru_order_and_pinning_raises(source) -> None:
    c = AdapterCache(source, cpu_budget_bytes=2 * ADAPTER_BYTES, tenant_share=1.0)
    await c.fetch("a/ad0")
    await c.fetch("a/ad1")
    await c.fetch("a/ad0")
    await c.fetch("a/ad2")  # evicts ad1, the least recent
    assert [c.status(k).state for k in ("a/ad0", "a/ad1", "a/ad2")] == [State.IN_CPU, State.ON_DISK, State.IN_CPU]
    await c.pin("a/ad0")
    await c.pin("a/ad2")
    with pytest.raises(BudgetExceeded):
        await c.fetch("a/ad3")
    assert c.stats()["cpu"]["bytes"] <= 2 * ADAPTER_BYTES


async def test_tenant_share_protects_other_tenants(source) -> None:
    c = AdapterCache(source, cpu_budget_bytes=4 * ADAPTER_BYTES, tenant_share=0.5)
    await c.fetch("b/ad4")
    await c.fetch("b/ad5")
    for i in range(4):  # tenant a pulls four adapters through a two-adapter share
        await c.fetch(f"a/ad{i}")
    assert c.status("b/ad4").state is State.IN_CPU and c.status("b/ad5").state is State.IN_CPU
    assert c.tenant_stats("a")["cpu_bytes"] <= 2 * ADAPTER_BYTES


async def test_corrupted_package_fails_alone(cache: AdapterCache, registry, tmp_path) -> None:
    good = registry.refs["a/ad0"]
    data = bytearray(good.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.tssp"
    bad.write_bytes(bytes(data))
    registry.refs["a/bad"] = PackageRef(tenant="a", path=bad, trusted_signers=good.trusted_signers)
    with pytest.raises(AdapterUnavailable) as info:
        await cache.load("a/bad", "embedded")
    assert "failed verification" in info.value.reason
    st = cache.status("a/bad")
    assert st.state is State.FAILED and st.reason == info.value.reason
    with pytest.raises(AdapterUnavailable):  # remembered, not retried on every request
        await cache.fetch("a/bad")
    await cache.load("a/ad0", "embedded")
    assert cache.status("a/ad0").state is State.IN_SLOT
    assert cache.counters.fetch_failures == 1


async def test_package_of_another_tenant_is_refused(cache: AdapterCache, registry) -> None:
    b_pkg = registry.refs["b/ad4"]
    registry.refs["a/stolen"] = PackageRef(tenant="a", path=b_pkg.path, trusted_signers=b_pkg.trusted_signers)
    with pytest.raises(AdapterUnavailable, match="another tenant"):
        await cache.fetch("a/stolen")


async def test_remove_clears_every_tier_and_waits_for_running_requests(cache: AdapterCache, slots, registry) -> None:
    await cache.fetch("a/ad3")
    await cache.load("a/ad0", "embedded")
    await cache.remove("a/ad0")
    assert "a/ad0" not in slots.resident() and cache.status("a/ad0").tiers == (Tier.DISK,)
    started, finish = asyncio.Event(), asyncio.Event()

    async def running() -> None:
        async with cache.lease("a/ad3", "embedded"):
            started.set()
            await finish.wait()

    task = asyncio.create_task(running())
    await started.wait()
    del registry.refs["a/ad3"]
    await cache.remove("a/ad3")
    assert "a/ad3" in slots.resident()  # still serving the request in flight
    with pytest.raises(UnknownAdapter):
        async with cache.lease("a/ad3", "embedded"):
            pass
    finish.set()
    await task
    assert "a/ad3" not in slots.resident()
    with pytest.raises(UnknownAdapter):
        await cache.fetch("a/ad3")


async def test_prefetch_warms_ahead(cache: AdapterCache, slots) -> None:
    await cache.prefetch("a/ad2", "embedded")
    assert "a/ad2" in slots.resident()
    hits = cache.counters.device_hits
    async with cache.lease("a/ad2", "embedded"):
        pass
    assert cache.counters.device_hits == hits + 1


async def test_decrypted_weights_are_never_written_to_disk(cache: AdapterCache, packages, tmp_path) -> None:
    dirs = {p.parent for _, p in packages.values()}
    before = {d: sorted(os.listdir(d)) for d in dirs}
    await cache.load("a/ad0", "embedded")
    await cache.fetch("b/ad4")
    assert {d: sorted(os.listdir(d)) for d in dirs} == before
    assert os.listdir(tmp_path) == []


async def test_requests_for_different_adapters_do_not_evict_each_others_fresh_loads(cache: AdapterCache,
                                                                                    slots) -> None:
    """One slot pinned by a long request, one free slot, and two adapters wanted at once: a
    fresh load must stay until its request takes the lease (no eviction ping-pong)."""
    release = asyncio.Event()

    async def hold() -> None:
        async with cache.lease("a/ad0", "embedded"):
            await release.wait()

    holder = asyncio.create_task(hold())
    while cache.stats()["device"]["embedded"]["leased"] < 1:
        await asyncio.sleep(0.01)
    served: list[str] = []

    async def use(key: str) -> None:
        async with cache.lease(key, "embedded"):
            served.append(key)
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(*(use(k) for _ in range(10) for k in ("a/ad1", "a/ad2"))), 30)
    assert sorted(served) == ["a/ad1"] * 10 + ["a/ad2"] * 10
    release.set()
    await holder


async def test_the_cpu_tier_keeps_the_slot_layout_and_concurrent_loads_share_the_slots(source, slots) -> None:
    cache = AdapterCache(source, cpu_budget_bytes=16 * ADAPTER_BYTES)
    cache.add_backend("embedded", slots)
    await cache.load("a/ad0", "embedded")
    adapter = await cache.fetch("a/ad0", slots.layout)
    assert isinstance(adapter.tensors, StackedLora) and adapter.tensors.dtype == slots.backend.engine.dtype
    assert adapter.nbytes == adapter.tensors.nbytes == cache.stats()["cpu"]["bytes"]  # that form only
    assert cache.counters.cpu_hits == 1
    # three loads at once for two slots: the copies overlap, the third evicts, none overflows
    await asyncio.gather(*(cache.fetch(k, slots.layout) for k in ("a/ad1", "a/ad2")))
    await asyncio.gather(*(cache.load(k, "embedded") for k in ("a/ad0", "a/ad1", "a/ad2")))
    assert len(slots.resident()) == 2 and cache.counters.loads == 3 and cache.counters.offloads == 1
    assert cache.stats()["device"]["embedded"]["adapters"] == 2
    async with cache.lease("a/ad3", "embedded"):
        assert "a/ad3" in slots.resident()


async def test_backends_of_two_layouts_each_get_their_form_from_one_open(source, slots) -> None:
    null = BackendSlots(NullBackend(max_loras=2, max_lora_rank=8))
    await null.backend.start()
    assert (null.layout, bool(slots.layout)) == ("", True)
    cache = AdapterCache(source, cpu_budget_bytes=16 * ADAPTER_BYTES)
    cache.add_backend("embedded", slots)
    cache.add_backend("null", null)
    await cache.load("a/ad0", "embedded")
    await cache.load("a/ad0", "null")
    assert cache.counters.fetches == 1  # opened (verified, decrypted) once for both
    opened, stacked = await cache.fetch("a/ad0"), await cache.fetch("a/ad0", slots.layout)
    assert not isinstance(opened.tensors, StackedLora) and isinstance(stacked.tensors, StackedLora)
    assert cache.stats()["cpu"]["bytes"] == opened.nbytes + stacked.nbytes  # both forms are counted
    assert cache.status("a/ad0").backends == ("embedded", "null")
    cache.evict("a/ad0")
    await cache.pin("a/ad1")  # pinning keeps every form a backend loads
    assert cache.stats()["cpu"]["bytes"] == opened.nbytes + stacked.nbytes  # ad1's two forms, as ad0's
    assert cache.counters.fetches == 2


async def test_a_layout_no_backend_loads_is_not_kept(source, slots) -> None:
    cache = AdapterCache(source, cpu_budget_bytes=16 * ADAPTER_BYTES)
    cache.add_backend("embedded", slots)
    await cache.load("a/ad0", "embedded")
    stacked = await cache.fetch("a/ad0", slots.layout)
    assert cache.stats()["cpu"]["bytes"] == stacked.nbytes  # the opened form went once prepared
    await cache.offload("a/ad0", "embedded")
    await cache.load("a/ad0", "embedded")  # warm: no second open
    assert cache.counters.fetches == 1


class RefusingSlots:
    """The embedded backend's slots, whose preparing refuses one adapter."""

    def __init__(self, slots: BackendSlots, refused: str) -> None:
        self.slots, self.refused, self.layout = slots, refused, slots.layout

    def prepare(self, adapter):
        if adapter.key == self.refused:
            raise ValueError("rank 4 adapters are not accepted here")
        return self.slots.prepare(adapter)

    def __getattr__(self, name: str):
        return getattr(self.slots, name)


async def test_a_failing_prepare_marks_only_that_adapter_failed(source, slots) -> None:
    refusing = RefusingSlots(slots, "a/ad1")
    cache = AdapterCache(source, cpu_budget_bytes=16 * ADAPTER_BYTES)
    cache.add_backend("embedded", refusing)
    with pytest.raises(AdapterUnavailable, match="not accepted here"):
        await cache.load("a/ad1", "embedded")
    status = cache.status("a/ad1")
    assert status.state is State.FAILED and "not accepted" in status.reason
    await cache.load("a/ad0", "embedded")
    assert slots.resident() == {"a/ad0"}


async def test_adapters_resident_before_the_cache_keep_their_slots(source, slots, engine) -> None:
    tensors = await source.open("a/ad3")
    engine.load_adapter("local:pinned", tensors.tensors, AdapterConfig(4, 8.0, ("q_proj",)))
    cache = AdapterCache(source, cpu_budget_bytes=16 * ADAPTER_BYTES)
    cache.add_backend("embedded", slots)
    for key in ("a/ad0", "a/ad1", "a/ad2", "a/ad0"):  # one slot left for the cache's adapters
        async with cache.lease(key, "embedded"):
            assert slots.resident() == {"local:pinned", key}
    assert "local:pinned" not in cache.stats()["tenants"] and cache.counters.offloads == 3


async def test_a_load_waiting_for_a_slot_is_not_starved_by_a_stream_of_leases(source) -> None:
    """Two adapters kept busy by overlapping requests never leave their slots on their own; a
    request for a third gets one of them let go (no new lease until it is evicted)."""
    null = BackendSlots(NullBackend(max_loras=2, max_lora_rank=8))
    await null.backend.start()
    cache = AdapterCache(source, cpu_budget_bytes=16 * ADAPTER_BYTES)
    cache.add_backend("null", null)
    stop = asyncio.Event()

    async def keep_busy(key: str) -> None:
        async def one() -> None:
            async with cache.lease(key, "null"):
                await asyncio.sleep(0.02)

        running: set[asyncio.Task] = set()
        while not stop.is_set():  # a new request starts before the last one ends
            task = asyncio.create_task(one())
            running.add(task)
            task.add_done_callback(running.discard)
            await asyncio.sleep(0.01)
        await asyncio.gather(*running)

    busy = [asyncio.create_task(keep_busy(k)) for k in ("a/ad0", "a/ad1")]
    while len(null.resident()) < 2:
        await asyncio.sleep(0.01)
    try:
        async with asyncio.timeout(10):
            async with cache.lease("a/ad2", "null"):
                assert "a/ad2" in null.resident()
    finally:
        stop.set()
        await asyncio.gather(*busy)
    assert cache.status("a/ad0").backends or cache.status("a/ad1").backends  # the other one kept serving
