"""Fair sharing against first come, first served on the dispatch benchmark's fleet model (4 null
backends; 8 sequence and 4 adapter slots each; a token takes 5 ms + 1 ms per running sequence;
an adapter load takes 20 ms and stalls its backend), through the gateway's pool, affinity
dispatch, per-backend queues and adapter cache. Requests read 64 tokens and generate 32 and
name one of their tenant's adapters (Zipf popularity). Two phases, each run under ``fcfs`` and
under ``fair`` on the same arrivals (the seed is printed):

1. overload (60 s): three tenants of weight 1; two light ones send a steady 10% of the fleet's
   capacity each, the heavy one floods at 10x its third: the fleet is far beyond 100% busy;
2. backlog (30 s): all three flood, with weights 1, 1 and 2.

One JSON line::

    {"fcfs": {"light_ttft_p50_ms", "light_ttft_p99_ms", "heavy_tok_per_s"}, "fair": {...},
     "share_error": ..., "shares": {...}, "seed": ...}

the light tenants' TTFT over phase 1 (a request still waiting when the phase ends counts with
the time it waited: a lower bound), and ``share_error`` = max over tenants of
|share_i / (w_i / sum w) - 1| over phase 2 under ``fair`` (share_i: tenant i's generated tokens
over everyone's). Bars: fair brings the light tenants' TTFT p99 to at most 0.5x FCFS's, and
``share_error`` is at most 0.1.

    python -m loadtests.bench_fairness [--seed 1] [--overload-s 60] [--backlog-s 30]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from cache import AdapterCache
from gateway.backends.base import BackendRequest, Sampling
from gateway.backends.null import NullBackend
from gateway.serving.fleet import Fleet

from .bench_dispatch import (ADAPTER_SLOTS, BACKENDS, LOAD_S, LORA, NEW_TOKENS, PER_SEQ_S, PROMPT_TOKENS, SEQ_SLOTS,
                             TOKEN_S, MemorySource, capacity_rps, pct)

TENANTS = ("light-1", "light-2", "heavy")
ADAPTERS_PER_TENANT = 16


def arrivals(rates: dict[str, float], seconds: float, rng: random.Random) -> list[tuple[float, str, str]]:
    """(time, tenant, adapter), Poisson per tenant, each tenant's adapters Zipf-popular."""
    weights = [1 / (i + 1) for i in range(ADAPTERS_PER_TENANT)]
    out = []
    for tenant, rate in rates.items():
        at = 0.0
        names = [f"{tenant}/a{i}" for i in range(ADAPTERS_PER_TENANT)]
        while True:
            at += rng.expovariate(rate)
            if at >= seconds:
                break
            out.append((at, tenant, rng.choices(names, weights)[0]))
    return sorted(out)


async def run_phase(plan: list[tuple[float, str, str]], seconds: float, weights: dict[str, float], fair: bool,
                    seed: int) -> dict:
    backends = [NullBackend(name=f"b{i}", tokens=NEW_TOKENS, token_delay_s=TOKEN_S, token_delay_per_seq_s=PER_SEQ_S,
                            load_delay_s=LOAD_S, max_num_seqs=SEQ_SLOTS, max_loras=ADAPTER_SLOTS, max_lora_rank=16,
                            max_queue=1 << 20) for i in range(BACKENDS)]
    for b in backends:
        await b.start()
    cache = AdapterCache(MemorySource(), cpu_budget_bytes=1 << 30, tenant_share=1.0)
    fleet = Fleet(cache, queue_limit=1 << 20, fair=fair)
    fleet.policy.rng = random.Random(seed)  # type: ignore[attr-defined]
    for b in backends:
        fleet.add("default", b)
    ttft: dict[str, list[float]] = {t: [] for t in weights}
    unserved: dict[str, list[float]] = {t: [] for t in weights}  # arrival times of requests without a token yet
    tokens: dict[str, int] = {t: 0 for t in weights}
    prompt = " ".join(["word"] * (PROMPT_TOKENS - 2))
    t0 = time.perf_counter()

    async def one(i: int, at: float, tenant: str, adapter: str) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        arrived = time.perf_counter()
        unserved[tenant].append(arrived)
        member, _ = fleet.choose(adapter, LORA.rank)
        async with fleet.slot(member, adapter, tenant, weights[tenant], PROMPT_TOKENS) as held, \
                cache.lease(adapter, member.name):
            req = BackendRequest(request_id=f"r{i}", sampling=Sampling(max_tokens=NEW_TOKENS, ignore_eos=True),
                                 prompt=prompt, adapter_id=adapter)
            async for chunk in member.backend.generate(req):
                if not held.generated_tokens:
                    ttft[tenant].append((time.perf_counter() - arrived) * 1000)
                    unserved[tenant].remove(arrived)
                if time.perf_counter() - t0 < seconds:
                    tokens[tenant] += chunk.completion_tokens - held.generated_tokens
                held.generated(chunk.completion_tokens)

    tasks = [asyncio.create_task(one(i, at, t, a)) for i, (at, t, a) in enumerate(plan)]
    await asyncio.sleep(seconds)
    end = time.perf_counter()
    for tenant, arrived in unserved.items():  # still waiting at the end: their TTFT is at least this
        ttft[tenant] += [(end - a) * 1000 for a in arrived]
    for task in tasks:  # what is still queued at the end of the phase goes unserved
        task.cancel()
    failed = [r for r in await asyncio.gather(*tasks, return_exceptions=True)
              if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)]
    if failed:
        raise failed[0]
    await cache.close()
    return {"ttft": ttft, "tokens": tokens, "seconds": seconds, "unserved": {t: len(a) for t, a in unserved.items()}}


async def main_async(args: argparse.Namespace) -> dict:
    capacity = capacity_rps()
    rng = random.Random(args.seed)
    overload = arrivals({"light-1": 0.1 * capacity, "light-2": 0.1 * capacity, "heavy": 10 * capacity / 3},
                        args.overload_s, rng)
    backlog = arrivals({t: capacity for t in TENANTS}, args.backlog_s, rng)
    backlog_weights = {"light-1": 1.0, "light-2": 1.0, "heavy": 2.0}
    out: dict = {"bench": "fairness", "seed": args.seed, "capacity_rps": round(capacity, 1),
                 "phases_s": {"overload": args.overload_s, "backlog": args.backlog_s}}
    for name, fair in (("fcfs", False), ("fair", True)):
        print(f"{name}: overload phase, {len(overload)} requests over {args.overload_s:.0f} s ...", file=sys.stderr)
        one = await run_phase(overload, args.overload_s, dict.fromkeys(TENANTS, 1.0), fair, args.seed)
        light = one["ttft"]["light-1"] + one["ttft"]["light-2"]
        out[name] = {"light_ttft_p50_ms": pct(light, 0.5), "light_ttft_p99_ms": pct(light, 0.99),
                     "light_requests": len(light),
                     "light_unserved_at_end": one["unserved"]["light-1"] + one["unserved"]["light-2"],
                     "heavy_tok_per_s": round(one["tokens"]["heavy"] / one["seconds"], 1)}
    print(f"fair: backlog phase, {len(backlog)} requests over {args.backlog_s:.0f} s ...", file=sys.stderr)
    two = await run_phase(backlog, args.backlog_s, backlog_weights, True, args.seed)
    total = sum(two["tokens"].values())
    weight_sum = sum(backlog_weights.values())
    shares = {t: n / total for t, n in two["tokens"].items()}
    error = max(abs(shares[t] / (backlog_weights[t] / weight_sum) - 1) for t in TENANTS)
    p99_ratio = out["fair"]["light_ttft_p99_ms"] / max(1e-9, out["fcfs"]["light_ttft_p99_ms"])
    out.update({"share_error": round(error, 4), "shares": {t: round(s, 4) for t, s in shares.items()},
                "weights": backlog_weights, "light_ttft_p99_fair_vs_fcfs": round(p99_ratio, 4),
                "bars": {"light_ttft_p99_fair_vs_fcfs": 0.5, "share_error": 0.1},
                "meets_bars": p99_ratio <= 0.5 and error <= 0.1})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--overload-s", type=float, default=60.0)
    ap.add_argument("--backlog-s", type=float, default=30.0)
    print(json.dumps(asyncio.run(main_async(ap.parse_args()))))


if __name__ == "__main__":
    main()
