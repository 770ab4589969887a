"""The dispatch policies term by term, the Gateway API Inference Extension's decision table,
the circuit breaker and the gateway's per-backend queue."""
from __future__ import annotations

import asyncio
import random

import pytest

from gateway.serving.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from gateway.serving.dispatch import (AffinityPolicy, Ask, BackendView, GiePolicy, LoadCosts, RoundRobinPolicy,
                                      reason_for)
from gateway.serving.slotqueue import QueueFull, SlotQueue

COSTS = LoadCosts(cpu_ms=2.0, disk_ms=20.0)


def view(name: str, **kw) -> BackendView:
    values = dict(name=name, sequence_slots=8, running=0, waiting=0, adapter_slots=4, free_adapter_slots=4,
                  service_ms=400.0)
    values.update(kw)
    return BackendView(**values)


# ---- affinity: each term -------------------------------------------------------------------
def test_wait_counts_what_is_ahead_beyond_the_free_sequence_slots():
    assert AffinityPolicy.wait_ms(view("a", running=7)) == 0  # one slot left
    assert AffinityPolicy.wait_ms(view("a", running=8)) == 400 / 8  # one ahead
    assert AffinityPolicy.wait_ms(view("a", running=8, waiting=3)) == 4 * 400 / 8
    assert AffinityPolicy.wait_ms(view("a", running=6, own=3)) == 0  # own dispatches are in running already


def test_load_is_free_when_resident_half_when_loading_and_by_tier_otherwise():
    resident = view("a", resident=frozenset({"x"}))
    assert AffinityPolicy.load_ms(Ask("x", "device"), resident, COSTS) == 0
    assert AffinityPolicy.load_ms(Ask(None), view("a"), COSTS) == 0  # the base model needs no load
    loading = view("a", loading=frozenset({"x"}))
    assert AffinityPolicy.load_ms(Ask("x", "disk"), loading, COSTS) == 10
    assert AffinityPolicy.load_ms(Ask("x", "cpu"), view("a"), COSTS) == 2
    assert AffinityPolicy.load_ms(Ask("x", "disk"), view("a"), COSTS) == 20
    assert AffinityPolicy.load_ms(Ask("x", "device"), view("a"), COSTS) == 2  # resident elsewhere: from CPU


def test_slot_wait_applies_only_when_every_adapter_slot_is_held():
    some_held = view("a", resident=frozenset("pqrs"), free_adapter_slots=0, holders={"p": 2, "q": 1})
    assert AffinityPolicy.slot_wait_ms(some_held) == 0  # r and s are idle: one is evicted
    all_held = view("a", resident=frozenset("pqrs"), free_adapter_slots=0, holders={"p": 2, "q": 1, "r": 3, "s": 1})
    assert AffinityPolicy.slot_wait_ms(all_held) == 400 * 1 / 2  # q or s frees after ~half a service
    hot = view("a", resident=frozenset("pqrs"), free_adapter_slots=0, holders={"p": 2, "q": 1, "r": 3, "s": 1},
               rates={"q": 10.0, "s": 10.0})  # q and s are asked for all the time: p frees first
    assert AffinityPolicy.slot_wait_ms(hot) == pytest.approx(400 * 2 / 3)
    dispatched_cold = view("a", resident=frozenset("pq"), free_adapter_slots=2, holders={"p": 1, "q": 1, "u": 1,
                                                                                     "v": 1})
    assert AffinityPolicy.slot_wait_ms(dispatched_cold) > 0  # u and v claim the free slots before they load


def test_harm_charges_a_load_to_the_sequences_it_stalls():
    policy = AffinityPolicy()
    idle, busy = view("a"), view("b", running=4)
    assert policy.cost(Ask("x", "disk"), idle, COSTS) == 20
    assert policy.cost(Ask("x", "disk"), busy, COSTS) == 20 + 20 * 4 / 8


def test_evicting_a_warm_adapter_costs_more_than_a_cold_one():
    full = dict(resident=frozenset("pqrs"), free_adapter_slots=0)
    cold, warm = view("a", victim_heat=0.0, **full), view("b", victim_heat=3.0, **full)
    assert AffinityPolicy.evict_ms(Ask("x"), cold, COSTS) == 0
    assert AffinityPolicy.evict_ms(Ask("x"), warm, COSTS) == pytest.approx(2 * 2 * 3 / 4)
    assert AffinityPolicy.evict_ms(Ask("x"), view("c", victim_heat=3.0), COSTS) == 0  # a free slot: no eviction
    assert AffinityPolicy().choose(Ask("x"), [warm, cold], COSTS).backend == "a"


def test_affinity_keeps_an_adapter_where_it_is_and_spills_when_that_backend_is_full():
    policy = AffinityPolicy(random.Random(0))
    home, other = view("home", resident=frozenset({"x"}), running=3), view("other")
    choice = policy.choose(Ask("x", "device"), [other, home], COSTS)
    assert (choice.backend, choice.reason) == ("home", "resident")
    full = view("home", resident=frozenset({"x"}), running=8, waiting=4)
    choice = policy.choose(Ask("x", "device"), [other, full], COSTS)
    assert (choice.backend, choice.reason) == ("other", "replica")
    assert policy.choose(Ask("y", "disk"), [view("a", running=2), view("b")], COSTS).reason == "free_slot"


def test_ties_go_to_fewer_own_dispatches():
    policy = AffinityPolicy(random.Random(0))
    for _ in range(5):
        assert policy.choose(Ask(None), [view("a", own=1), view("b")], COSTS).backend == "b"


# ---- the Gateway API Inference Extension ----------------------------------------------------
@pytest.mark.parametrize("backend,expected", [
    (view("b", running_adapters=frozenset({"x", "p"})), 1.0),  # the adapter is active here
    (view("b", running_adapters=frozenset({"p"}), waiting_adapters=frozenset({"q"})), 0.8),  # room for one more
    (view("b", adapter_slots=2, running_adapters=frozenset({"p"}), waiting_adapters=frozenset({"x"})), 0.6),
    (view("b", adapter_slots=2, running_adapters=frozenset({"p", "q"})), 0.0),  # full, and x not waiting
])
def test_gie_lora_affinity_decision_table(backend, expected):
    assert GiePolicy.lora_score(Ask("x"), backend) == expected


def test_gie_queue_score_is_relative_to_the_candidates():
    a, b, c = view("a", waiting=0), view("b", waiting=2), view("c", waiting=4)
    assert GiePolicy.queue_scores([a, b, c]) == [1.0, 0.5, 0.0]
    assert GiePolicy.queue_scores([b, view("d", waiting=2)]) == [1.0, 1.0]  # all equal: neutral


def test_gie_sums_the_two_scores_and_breaks_ties_at_random():
    active_but_queued = view("a", running_adapters=frozenset({"x"}), waiting=4)  # 1.0 + 0.0
    room_and_idle = view("b")  # 0.8 + 1.0
    assert GiePolicy(random.Random(0)).choose(Ask("x"), [active_but_queued, room_and_idle], COSTS).backend == "b"
    picks = {GiePolicy(random.Random(s)).choose(Ask("x"), [view("a"), view("b")], COSTS).backend for s in range(20)}
    assert picks == {"a", "b"}


def test_round_robin_takes_turns():
    policy = RoundRobinPolicy()
    backends = [view("b"), view("a"), view("c")]
    assert [policy.choose(Ask(None), backends, COSTS).backend for _ in range(4)] == ["a", "b", "c", "a"]


def test_reasons():
    x = Ask("x")
    assert reason_for(x, view("a"), [view("a")]) == "only_choice"
    assert reason_for(x, view("a", loading=frozenset({"x"})), [view("a"), view("b")]) == "loading"
    assert reason_for(x, view("a"), [view("a"), view("b", resident=frozenset({"x"}))]) == "replica"


# ---- breaker --------------------------------------------------------------------------------
def test_breaker_opens_after_failures_then_lets_one_probe_through():
    now = [0.0]
    b = Breaker(failures=3, cooldown_s=5.0, clock=lambda: now[0])
    b.failure()
    b.failure()
    assert b.state == CLOSED and b.allows()
    b.success()  # a success resets the count
    for _ in range(3):
        b.failure()
    assert b.state == OPEN and not b.allows()
    now[0] = 5.0
    assert b.state == HALF_OPEN and b.allows()
    b.sent()
    assert not b.allows()  # one probe at a time
    b.failure()
    assert b.state == OPEN  # the probe failed: another cool-down
    now[0] = 10.0
    b.sent()
    b.success()
    assert b.state == CLOSED and b.allows()


# ---- the per-backend queue --------------------------------------------------------------------
async def test_slot_queue_fills_its_capacity_then_serves_waiters_in_order():
    q = SlotQueue(capacity=2, limit=2)
    await q.acquire()
    await q.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await q.acquire()
        order.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(2)]
    await asyncio.sleep(0)
    assert q.waiting == 2 and q.holders == 2
    with pytest.raises(QueueFull):
        await q.acquire()
    q.release()
    q.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1] and q.holders == 2


async def test_a_cancelled_waiter_leaves_the_queue_and_a_slot_it_was_given_passes_on():
    q = SlotQueue(capacity=1, limit=5)
    await q.acquire()
    first = asyncio.create_task(q.acquire())
    second = asyncio.create_task(q.acquire())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    assert q.waiting == 1
    q.release()  # goes to the second waiter
    await asyncio.wait_for(second, 1)
    third = asyncio.create_task(q.acquire())
    await asyncio.sleep(0)
    q.release()  # handed to the third ...
    third.cancel()  # ... which gives up at that very moment: the slot is released again
    with pytest.raises(asyncio.CancelledError):
        await third
    assert q.holders == 0 and q.waiting == 0


async def test_resizing_lets_waiters_in():
    q = SlotQueue(capacity=1, limit=5)
    await q.acquire()
    waiter = asyncio.create_task(q.acquire())
    await asyncio.sleep(0)
    q.resize(2)
    await asyncio.wait_for(waiter, 1)
    assert q.holders == 2
