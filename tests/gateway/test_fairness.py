"""Weighted fair sharing between tenants on a busy backend (the gateway's queue in front of a
real null backend, charged as the gateway charges it): shares follow the weights whatever
each tenant sends, a tenant alone gets the whole backend, idle time earns no credit, a
tenant's own requests keep their order, and the same through the HTTP gateway."""
from __future__ import annotations

import asyncio
import json

import pytest

from gateway.backends.base import BackendRequest, Sampling
from gateway.backends.null import NullBackend
from gateway.serving.fleet import Fleet
from gateway.serving.slotqueue import SlotQueue

from .conftest import BASE
from .test_tenancy import CHAT, HELLO, World, running

TOKENS = 10


async def fleet_of_one(fair: bool = True, slots: int = 2) -> Fleet:
    backend = NullBackend(name="b", tokens=TOKENS, token_delay_s=0.001, max_num_seqs=slots, max_queue=10_000)
    await backend.start()
    fleet = Fleet(queue_limit=10_000, fair=fair)
    fleet.add("default", backend)
    return fleet


class Served:
    """Generated tokens per tenant, in the order they came out."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []  # (tenant, tokens of one finished request)
        self.order: dict[str, list[int]] = {}

    async def request(self, fleet: Fleet, tenant: str, weight: float = 1.0, index: int = 0, prompt_tokens: int = 4):
        member = fleet.members["b"]
        async with fleet.slot(member, None, tenant, weight, prompt_tokens) as held:
            self.order.setdefault(tenant, []).append(index)
            req = BackendRequest(f"{tenant}-{index}", Sampling(max_tokens=TOKENS, ignore_eos=True),
                                 prompt=" ".join(["w"] * prompt_tokens))
            async for chunk in member.backend.generate(req):
                held.generated(chunk.completion_tokens)
            self.log.append((tenant, chunk.completion_tokens))

    def shares(self, upto: int) -> dict[str, float]:
        """Each tenant's share of the tokens of the first ``upto`` finished requests."""
        counted: dict[str, int] = {}
        for tenant, n in self.log[:upto]:
            counted[tenant] = counted.get(tenant, 0) + n
        total = sum(counted.values())
        return {t: n / total for t, n in counted.items()}


async def flood(fleet: Fleet, served: Served, plan: dict[str, tuple[int, float]]) -> None:
    """Every tenant's requests at once: ``plan`` is tenant -> (requests, weight)."""
    await asyncio.gather(*(served.request(fleet, t, w, i) for t, (n, w) in plan.items() for i in range(n)))


async def test_a_heavy_tenant_gets_no_more_than_its_share_while_both_wait():
    fleet, served = await fleet_of_one(), Served()
    await flood(fleet, served, {"heavy": (100, 1.0), "light": (10, 1.0)})
    window = 16  # while both were backlogged (light has 10 requests, half of these)
    assert served.shares(window)["light"] == pytest.approx(0.5, rel=0.1)
    light_done = max(i for i, (t, _) in enumerate(served.log) if t == "light")
    assert light_done < 25  # served alongside, not behind the heavy tenant's 100


async def test_without_fair_sharing_the_light_tenant_waits_behind_the_heavy_one():
    fleet, served = await fleet_of_one(fair=False), Served()
    await flood(fleet, served, {"heavy": (100, 1.0), "light": (10, 1.0)})
    light_done = max(i for i, (t, _) in enumerate(served.log) if t == "light")
    assert light_done > 90  # first come, first served: the peer this is measured against


async def test_weights_two_to_one_give_two_to_one():
    fleet, served = await fleet_of_one(), Served()
    await flood(fleet, served, {"gold": (60, 2.0), "bronze": (60, 1.0)})
    shares = served.shares(60)  # both still backlogged
    assert shares["gold"] / shares["bronze"] == pytest.approx(2.0, rel=0.1)


async def test_a_tenant_alone_gets_the_whole_backend():
    fleet, served = await fleet_of_one(), Served()
    await flood(fleet, served, {"solo": (20, 0.5)})
    assert served.shares(20) == {"solo": 1.0} and len(served.log) == 20
    member = fleet.members["b"]
    assert member.queue.holders == 0 and member.queue.waiting == 0


async def test_an_idle_tenant_gets_no_burst_credit():
    fleet, served = await fleet_of_one(), Served()
    await flood(fleet, served, {"early": (30, 1.0)})  # early runs alone for a while
    queue = fleet.members["b"].queue
    served.log.clear()
    await flood(fleet, served, {"early": (30, 1.0), "late": (30, 1.0)})  # late has been idle all along
    assert served.shares(30)["late"] == pytest.approx(0.5, rel=0.1)  # an even split, not late first
    assert queue.counters["late"] >= queue.counters["early"] - 4 * TOKENS * 2  # lifted, not left at zero


async def test_a_tenants_own_requests_keep_their_order():
    fleet, served = await fleet_of_one(slots=1), Served()
    await flood(fleet, served, {"a": (15, 1.0), "b": (15, 3.0)})
    assert served.order["a"] == sorted(served.order["a"]) and served.order["b"] == sorted(served.order["b"])


def test_charges_follow_the_output_weight_and_the_tenant_weight():
    queue = SlotQueue(1, 10, output_weight=2.0)
    queue.charge("t", 2.0, input_tokens=10, output_tokens=5)
    assert queue.counters["t"] == (10 + 2 * 5) / 2.0


async def test_fair_sharing_through_the_gateway(tmp_path):
    pool = {"name": "cpu", "kind": "null", "count": 1,
            "options": {"max_num_seqs": 2, "token_delay_s": 0.002, "max_queue": 1000}}
    async with running(tmp_path, pools=json.dumps([pool]), null_tokens=TOKENS) as (app, client):
        w = World(client, app, tmp_path)
        await w.setup_tenant("gold", quotas={"weight": 2})
        await w.setup_tenant("bronze")
        finished: list[str] = []

        async def one(tenant: str) -> None:
            r = await client.post(CHAT, json={"model": BASE, "messages": HELLO, "max_tokens": TOKENS},
                                  headers=w.h(tenant))
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == TOKENS
            finished.append(tenant)

        await asyncio.gather(*(one(t) for t in ["gold"] * 30 + ["bronze"] * 30))
        first = finished[:30]  # both backlogged throughout
        assert first.count("gold") / first.count("bronze") == pytest.approx(2.0, rel=0.15)
        text = (await client.get("/metrics", headers=w.h("admin"))).text
        assert 'tensafe_tenant_service_tokens_total{tenant="gold"}' in text
        assert 'tensafe_queue_wait_seconds_count{pool="cpu",tenant="bronze"}' in text
