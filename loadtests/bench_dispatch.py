"""Dispatch policies over a simulated fleet: adapter loads, TTFT and throughput per policy.

The fleet is 4 null backends modelling an engine (8 sequence slots and 4 adapter slots each;
a token takes 5 ms + 1 ms per running sequence; an adapter load takes 20 ms and stalls every
sequence on its backend), behind the gateway's own pool, policies, per-backend queues and
adapter cache. Requests (64 prompt tokens, 32 generated) name one of 64 adapters with Zipf(1.0)
popularity, owned by 3 tenants, and arrive as a Poisson stream at about 70% of the fleet's
capacity; every policy gets the same arrivals (the seed is printed). One JSON line::

    {"policies": {"round_robin" | "gie" | "affinity": {"adapter_loads", "ttft_ms": {"p50", "p99"},
     "tok_per_s"}}, "seed": ..., "bars": ..., "meets_bars": ...}

Bars: affinity makes at most half of round-robin's adapter loads, and its TTFT p99 is at most
0.8x gie's. Beside the policies, three floors for the loads on the same arrivals, all with the
16 adapter slots in one pool and no sequence-slot limit: ``ideal_pooled`` (each request holds
its adapter for one full-batch service time, a miss evicts the coldest idle adapter: what any
policy over partitioned backends can at best approach), ``oracle_popularity`` (the same, but a
miss evicts the idle adapter of the lowest true popularity: for requests drawn independently
from a known distribution, the best any policy that does not see the future can do) and
``clairvoyant`` (Belady's: evict the adapter asked for again last, knowing every future
arrival and ignoring that requests hold their adapters: no policy reaches it).

    python -m loadtests.bench_dispatch [--requests 512] [--seed 1] [--load 0.7]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from adapters.lora import LoraConfig
from cache import AdapterCache, Decrypted, UnknownAdapter
from gateway.backends.base import BackendRequest, Sampling
from gateway.backends.null import NullBackend
from gateway.serving.fleet import Fleet

BACKENDS, SEQ_SLOTS, ADAPTER_SLOTS = 4, 8, 4
TOKEN_S, PER_SEQ_S, LOAD_S = 0.005, 0.001, 0.020
PROMPT_TOKENS, NEW_TOKENS = 64, 32
ADAPTERS, TENANTS = 64, 3
LORA = LoraConfig(8, 16.0, ("q_proj", "v_proj"))


class MemorySource:
    """The disk tier of the simulation: every adapter opens at once, with no tensors (the null
    backends need none), owned by one of the tenants."""

    async def open(self, key: str) -> Decrypted:
        if "/" not in key:
            raise UnknownAdapter(key)
        return Decrypted(key=key, tenant=key.split("/")[0], lora=LORA, tensors={}, nbytes=1 << 20)


def capacity_rps() -> float:
    """Requests per second the fleet completes at full batches."""
    step_s = TOKEN_S + PER_SEQ_S * SEQ_SLOTS
    return BACKENDS * SEQ_SLOTS / (NEW_TOKENS * step_s)


def zipf_adapters() -> tuple[list[str], list[float]]:
    """The adapters' names and their Zipf(1.0) weights (unnormalized)."""
    return [f"t{i % TENANTS}/a{i}" for i in range(ADAPTERS)], [1 / (i + 1) for i in range(ADAPTERS)]


def arrivals(n: int, rate: float, rng: random.Random) -> list[tuple[float, str]]:
    names, weights = zipf_adapters()
    at, out = 0.0, []
    for _ in range(n):
        at += rng.expovariate(rate)
        out.append((at, rng.choices(names, weights)[0]))
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def run_policy(policy: str, plan: list[tuple[float, str]], seed: int) -> dict:
    backends = [NullBackend(name=f"b{i}", tokens=NEW_TOKENS, token_delay_s=TOKEN_S, token_delay_per_seq_s=PER_SEQ_S,
                            load_delay_s=LOAD_S, max_num_seqs=SEQ_SLOTS, max_loras=ADAPTER_SLOTS, max_lora_rank=16,
                            max_queue=4096) for i in range(BACKENDS)]
    for b in backends:
        await b.start()
    cache = AdapterCache(MemorySource(), cpu_budget_bytes=1 << 30, tenant_share=1.0)
    fleet = Fleet(cache, policy=policy, queue_limit=4096)
    fleet.policy.rng = random.Random(seed)  # type: ignore[attr-defined]
    for backend in backends:
        fleet.add("default", backend)
    ttfts: list[float] = []
    tokens = 0
    prompt = " ".join(["word"] * (PROMPT_TOKENS - 2))

    async def one(i: int, at: float, adapter: str, t0: float) -> None:
        nonlocal tokens
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        arrived = time.perf_counter()
        member, _ = fleet.choose(adapter, LORA.rank)
        async with fleet.slot(member, adapter, adapter.split("/")[0]), cache.lease(adapter, member.name):
            req = BackendRequest(request_id=f"r{i}", sampling=Sampling(max_tokens=NEW_TOKENS, ignore_eos=True),
                                 prompt=prompt, adapter_id=adapter)
            first = True
            async for chunk in member.backend.generate(req):
                if first:
                    ttfts.append((time.perf_counter() - arrived) * 1000)
                    first = False
                if chunk.finish_reason is not None:
                    tokens += chunk.completion_tokens
            member.breaker.success()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, at, name, t0) for i, (at, name) in enumerate(plan)))
    elapsed = time.perf_counter() - t0
    await cache.close()
    return {"adapter_loads": sum(b.loads for b in backends),
            "ttft_ms": {"p50": pct(ttfts, 0.5), "p99": pct(ttfts, 0.99)},
            "tok_per_s": round(tokens / elapsed, 1)}


def popularity() -> dict[str, float]:
    """Each adapter's share of the requests (what ``arrivals`` draws from)."""
    names, weights = zipf_adapters()
    return {name: w / sum(weights) for name, w in zip(names, weights, strict=True)}


def clairvoyant_loads(plan: list[tuple[float, str]]) -> int:
    """Belady's loads over every adapter slot in one pool (see the module docstring)."""
    names = [a for _, a in plan]
    following, seen = [0] * len(names), {}
    for i in range(len(names) - 1, -1, -1):  # where each arrival's adapter is asked for next
        following[i] = seen.get(names[i], len(names))
        seen[names[i]] = i
    resident: dict[str, int] = {}  # adapter -> the arrival that asks for it next
    loads = 0
    for i, a in enumerate(names):
        if a not in resident:
            loads += 1
            if len(resident) >= BACKENDS * ADAPTER_SLOTS:
                del resident[max(resident, key=resident.__getitem__)]
        resident[a] = following[i]
    return loads


def ideal_pooled_loads(plan: list[tuple[float, str]], half_life_s: float = 10.0,
                       known: dict[str, float] | None = None) -> int:
    """The loads of one pool of every adapter slot (see the module docstring); with ``known``
    popularity, a miss evicts the least popular idle adapter instead of the coldest."""
    import heapq

    service_s = NEW_TOKENS * (TOKEN_S + PER_SEQ_S * (SEQ_SLOTS - 1))
    slots = BACKENDS * ADAPTER_SLOTS
    resident: set[str] = set()
    held: dict[str, int] = {}
    heat: dict[str, tuple[float, float]] = {}
    ends: list[tuple[float, str]] = []
    loads = 0

    def heat_at(a: str, t: float) -> float:
        value, at = heat.get(a, (0.0, t))
        return value * 0.5 ** ((t - at) / half_life_s)

    for t, a in plan:
        while ends and ends[0][0] <= t:
            _, done = heapq.heappop(ends)
            held[done] -= 1
            if not held[done] and len(resident) > slots:
                resident.discard(done)  # it only ever held a slot lent past the budget
        heat[a] = (heat_at(a, t) + 1, t)
        if a not in resident:
            loads += 1
            idle = [x for x in resident if not held.get(x)]
            if len(resident) >= slots and idle:
                resident.discard(min(idle, key=known.__getitem__ if known else lambda x: heat_at(x, t)))
            resident.add(a)
        held[a] = held.get(a, 0) + 1
        heapq.heappush(ends, (t + service_s, a))
    return loads


async def main_async(args: argparse.Namespace) -> dict:
    plan = arrivals(args.requests, args.load * capacity_rps(), random.Random(args.seed))
    results = {}
    for policy in ("round_robin", "gie", "affinity"):
        print(f"{policy}: {args.requests} requests at {args.load:.0%} of {capacity_rps():.1f} req/s ...",
              file=sys.stderr)
        results[policy] = await run_policy(policy, plan, args.seed)
    a, rr, gie = results["affinity"], results["round_robin"], results["gie"]
    loads_ratio = a["adapter_loads"] / max(1, rr["adapter_loads"])
    p99_ratio = a["ttft_ms"]["p99"] / max(1e-9, gie["ttft_ms"]["p99"])
    floors = {"ideal_pooled": ideal_pooled_loads(plan), "oracle_popularity": ideal_pooled_loads(plan, known=popularity()),
              "clairvoyant": clairvoyant_loads(plan)}
    return {"bench": "dispatch", "policies": results, "seed": args.seed, "requests": args.requests,
            "load": args.load, **{name: {"adapter_loads": loads, "vs_round_robin": round(loads / max(1, rr["adapter_loads"]), 3)}
                                  for name, loads in floors.items()},
            "ratios": {"loads_vs_round_robin": round(loads_ratio, 3), "ttft_p99_vs_gie": round(p99_ratio, 3)},
            "bars": {"loads_vs_round_robin": 0.5, "ttft_p99_vs_gie": 0.8},
            "meets_bars": loads_ratio <= 0.5 and p99_ratio <= 0.8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--load", type=float, default=0.7, help="arrival rate as a share of the fleet's capacity")
    print(json.dumps(asyncio.run(main_async(ap.parse_args()))))


if __name__ == "__main__":
    main()
