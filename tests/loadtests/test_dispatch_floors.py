"""The floors bench_dispatch prints beside the policies' adapter loads: each counts what its
definition says on arrivals small enough to count by hand."""
from __future__ import annotations

import random

from loadtests import bench_dispatch as bench

SLOTS = bench.BACKENDS * bench.ADAPTER_SLOTS


def spaced(names: list[str]) -> list[tuple[float, str]]:
    """Arrivals far enough apart that no request still holds its adapter at the next."""
    return [(i * 10.0, a) for i, a in enumerate(names)]


def test_clairvoyant_evicts_the_adapter_asked_for_again_last():
    fill = [f"f{i}" for i in range(SLOTS)]
    # the pool is full; "x" must evict: f0 comes back next, f1 after it, the rest never, so
    # Belady keeps f0 and f1 and the only loads are the first fill and "x"
    assert bench.clairvoyant_loads(spaced([*fill, "x", "f0", "f1"])) == SLOTS + 1
    # every arrival a new adapter: a load each
    assert bench.clairvoyant_loads(spaced([f"n{i}" for i in range(40)])) == 40


def test_oracle_popularity_evicts_the_least_popular_idle_adapter():
    known = {f"f{i}": 1.0 - i / 100 for i in range(SLOTS)} | {"x": 0.001, "y": 0.5}
    fill = [f"f{i}" for i in range(SLOTS)]
    # "y" evicts f15 (the least popular resident); f0 then hits, f15 loads again
    assert bench.ideal_pooled_loads(spaced([*fill, "y", "f0"]), known=known) == SLOTS + 1
    assert bench.ideal_pooled_loads(spaced([*fill, "y", "f15"]), known=known) == SLOTS + 2


def test_a_request_holding_its_adapter_keeps_it_resident():
    known = {f"f{i}": 1.0 for i in range(SLOTS)} | {"x": 0.0}
    # all at once: every adapter is held when "x" arrives, so it takes a slot lent past the
    # budget and nobody is evicted: f0 hits
    burst = [(0.0, f"f{i}") for i in range(SLOTS)] + [(0.0, "x"), (0.0, "f0")]
    assert bench.ideal_pooled_loads(burst, known=known) == SLOTS + 1


def test_on_the_benchmarks_arrivals_the_floors_are_ordered():
    plan = bench.arrivals(512, 0.7 * bench.capacity_rps(), random.Random(1))
    distinct = len({a for _, a in plan})
    clairvoyant = bench.clairvoyant_loads(plan)
    oracle = bench.ideal_pooled_loads(plan, known=bench.popularity())
    assert distinct <= clairvoyant < oracle <= len(plan)
    assert abs(sum(bench.popularity().values()) - 1) < 1e-9
