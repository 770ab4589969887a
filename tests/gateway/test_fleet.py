"""A pool of several in-process null backends behind the real app (real store, real cache, real
packages): affinity keeps an adapter where it is, a full backend spills, a failing backend is
routed around and its breaker opens and recovers, drain through the API (and through another
replica sharing the store), deletion clears every backend, the admin view and the fleet
metrics."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.keys import current_recipient_from_document

from .conftest import BASE
from .test_tenancy import ADMIN, CHAT, HELLO, World, running

POOL = {"name": "cpu", "kind": "null", "count": 3,
        "options": {"max_num_seqs": 2, "max_loras": 2, "token_delay_s": 0.005, "load_delay_s": 0.01}}


def fleet_of(world: World):
    return world.gateway.fleet


@pytest.fixture()
async def world(tmp_path):
    async with running(tmp_path, pools=json.dumps([POOL]), breaker_failures=2, breaker_cooldown_s=0.3,
                       health_interval_s=3600, null_tokens=4) as (app, client):
        w = World(client, app, tmp_path)
        w.recipient = current_recipient_from_document((await client.get("/v1/tssp/recipient")).json())
        await w.setup_tenant("a")
        for name in ("x", "y", "z"):
            r = await w.upload("a", w.package("a", name, seed=ord(name)))
            assert r.status_code == 201, r.text
        yield w


async def chat(world: World, model: str, **extra) -> httpx.Response:
    return await world.client.post(CHAT, json={"model": model, "messages": HELLO, **extra}, headers=world.h("a"))


def loads(world: World) -> dict[str, int]:
    return {name: m.backend.loads for name, m in fleet_of(world).members.items()}


def holding(world: World, adapter: str) -> list[str]:
    return sorted(name for name, m in fleet_of(world).members.items() if adapter in m.backend.adapters())


async def test_a_pool_of_three_backends_serves_and_keeps_an_adapter_where_it_is(world):
    assert sorted(fleet_of(world).members) == ["cpu-0", "cpu-1", "cpu-2"]
    for _ in range(6):
        assert (await chat(world, "x")).status_code == 200
    assert sum(loads(world).values()) == 1  # loaded once, then every request went where it was
    assert len(holding(world, "a/x@1")) == 1
    base = await asyncio.gather(*(chat(world, BASE) for _ in range(6)))
    assert all(r.status_code == 200 for r in base)


async def test_a_full_backend_spills_to_another(world):
    await chat(world, "x")
    [home] = holding(world, "a/x@1")
    replies = await asyncio.gather(*(chat(world, "x", max_tokens=40) for _ in range(6)))  # 2 slots per backend
    assert all(r.status_code == 200 for r in replies)
    assert len(holding(world, "a/x@1")) >= 2  # a copy where there was room (reason "replica")
    assert home in holding(world, "a/x@1")


async def test_a_failing_backend_is_routed_around_its_breaker_opens_and_it_recovers(world):
    fleet = fleet_of(world)
    victim = fleet.members["cpu-0"]
    await victim.backend.close()  # refuses everything from now on, as a dead process would
    replies = [await chat(world, BASE) for _ in range(8)]
    assert all(r.status_code == 200 for r in replies)  # requests sent to it were retried elsewhere
    assert victim.breaker.state == "open"
    await asyncio.sleep(0.35)  # the cool-down passes: one probe may go
    assert victim.breaker.state == "half_open"
    await fleet.check()
    assert not victim.up  # the health check sees it down: no probe either
    await victim.backend.start()
    await fleet.check()
    assert victim.up and victim.breaker.state == "closed"
    fleet.refresh(force=True)
    used = {fleet.choose(None)[0].name for _ in range(9)}
    assert "cpu-0" in used


async def test_with_every_backend_down_the_answer_is_a_503_with_retry_after(world):
    for member in fleet_of(world).members.values():
        await member.backend.close()
    codes = []
    for _ in range(6):
        r = await chat(world, BASE)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        codes.append(r.json()["error"]["code"])
    assert set(codes) <= {"no_backend", "backend_unavailable"} and codes[-1] == "no_backend"  # breakers open
    assert all(m.breaker.state == "open" for m in fleet_of(world).members.values())


async def test_drain_through_the_api_stops_dispatch_and_survives_a_restart(world, tmp_path):
    admin = world.h("admin")
    r = await world.client.post("/admin/backends/cpu/cpu-1/drain", headers=admin)
    assert r.status_code == 200 and r.json()["drained"] is True
    fleet = fleet_of(world)
    fleet.refresh(force=True)
    assert "cpu-1" not in {fleet.choose(None)[0].name for _ in range(12)}
    listing = (await world.client.get("/admin/backends", headers=admin)).json()
    assert [(b["id"], b["drained"]) for b in listing["data"]] == [("cpu-0", False), ("cpu-1", True), ("cpu-2", False)]
    assert listing["pools"] == {"cpu": 3} and listing["data"][0]["sequence_slots"]["max"] == 2
    assert (await world.client.post("/admin/backends/cpu/nope/drain", headers=admin)).status_code == 404
    assert (await world.client.get("/admin/backends", headers=world.h("a"))).status_code == 403
    audit = (await world.client.get("/admin/audit", headers=admin)).json()["data"]
    assert audit[-1]["action"] == "backend.drain" and audit[-1]["target"] == "cpu/cpu-1"
    assert await world.gateway.store.drained() == {"cpu/cpu-1": audit[-1]["time"]}
    r = await world.client.post("/admin/backends/cpu/cpu-1/undrain", headers=admin)
    assert r.json()["drained"] is False and await world.gateway.store.drained() == {}


async def test_a_drain_set_through_one_replica_applies_on_another(tmp_path, redis_server, redis_client):
    pools = json.dumps([POOL])
    async with running(tmp_path / "one", store_url=redis_server.url, pools=pools) as (app1, c1), \
            running(tmp_path / "two", store_url=redis_server.url, pools=pools) as (app2, c2):
        r = await c1.post("/admin/backends/cpu/cpu-2/drain", headers={"authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200
        other = app2.state.gateway
        assert not other.fleet.members["cpu-2"].drained
        await other._check_fleet()  # its next periodic check
        assert other.fleet.members["cpu-2"].drained


async def test_deleting_an_adapter_removes_it_from_every_backend(world):
    await chat(world, "y")
    replies = await asyncio.gather(*(chat(world, "y", max_tokens=40) for _ in range(6)))
    assert all(r.status_code == 200 for r in replies) and len(holding(world, "a/y@1")) >= 2
    assert (await world.client.delete("/v1/adapters/y", headers=world.h("a"))).status_code == 200
    assert holding(world, "a/y@1") == []
    assert (await chat(world, "y")).status_code == 404


async def test_fleet_metrics_carry_pool_and_backend(world):
    await chat(world, "x", stream=True)
    await chat(world, "z")
    text = (await world.client.get("/metrics", headers=world.h("admin"))).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    up = {s.labels["backend"]: s.value for s in families["tensafe_backend_up"].samples}
    assert up == {"cpu-0": 1.0, "cpu-1": 1.0, "cpu-2": 1.0}
    assert {s.labels["pool"] for s in families["tensafe_running"].samples} == {"cpu"}
    ttft = [s for s in families["tensafe_ttft_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in ttft) == 2 and {s.labels["tenant"] for s in ttft} == {"a"}
    assert sum(s.value for s in families["tensafe_itl_seconds"].samples if s.name.endswith("_count")) == 2
    reasons = {s.labels["reason"] for s in families["tensafe_dispatch"].samples if s.name.endswith("_total")}
    assert reasons <= {"resident", "free_slot", "loading", "replica", "failover", "only_choice"} and reasons
    loads = [s for s in families["tensafe_adapter_loads"].samples if s.name.endswith("_total")]
    assert {s.labels["tier"] for s in loads} <= {"cpu", "disk"} and sum(s.value for s in loads) == 2
    assert sum(s.value for s in families["tensafe_resident_adapters"].samples) == 2


async def test_a_metrics_key_reads_metrics_and_nothing_else(world):
    r = await world.client.post("/admin/keys", json={"scopes": ["metrics"], "name": "prometheus"},
                                headers=world.h("admin"))
    assert r.status_code == 201, r.text
    scraper = {"authorization": f"Bearer {r.json()['key']}"}
    assert (await world.client.get("/metrics", headers=scraper)).status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/admin/tenants"), ("GET", "/admin/backends"),
                         ("POST", CHAT), ("GET", "/v1/usage")):
        assert (await world.client.request(method, path, headers=scraper)).status_code == 403, path
    assert (await world.client.get("/metrics", headers=world.h("a"))).status_code == 403
