"""Adapter cache load latencies and multi-adapter throughput on the embedded engine.

  python -m loadtests.bench_cache [--repeats 30] [--adapters 1000] [--requests 256]

Prints one JSON line with, at the top level:
- ``cold_ms_p50``/``cold_ms_p95``: disk -> slot for a rank-16 adapter on all seven projections
  (read + verify + unwrap + decrypt + validate + copy into an engine slot);
- ``warm_ms_p50``/``warm_ms_p95``: CPU tier -> slot for the same adapter;
- ``zipf1000_vs_single``: generated tokens/s of a Zipf(1.1) request stream over N rank-4
  adapters (cold loads and evictions included) relative to the same stream on one adapter.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.base_model import BaseModelSpec
from adapters.keys import generate_recipient_key, generate_signing_key
from adapters.package import pack
from cache import AdapterCache, UnknownAdapter
from cache.tssp import PackageRef, TsspSource
from engine import EngineConfig, GenerationRequest, SamplingParams
from engine.config import DEFAULT_MODEL, default_cache_dir
from engine.model.checkpoint import resolve_checkpoint
from gateway.backends.embedded import EmbeddedBackend
from gateway.serving.slots import BackendSlots
from gateway.server import settle_gc

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_dir(root: Path, spec: BaseModelSpec, rank: int, modules: tuple[str, ...], seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_hidden_layers):
        for m in modules:
            fan_in, fan_out = spec.projection_shape(m)
            kind = "self_attn" if m in MODULES[:4] else "mlp"
            p = f"base_model.model.model.layers.{layer}.{kind}.{m}"
            tensors[f"{p}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) * 0.02).bfloat16()
            tensors[f"{p}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.02).bfloat16()
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules), "bias": "none"}))
    save_file(tensors, str(root / "adapter_model.safetensors"))
    return root


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


async def main_async(args: argparse.Namespace) -> dict:
    checkpoint = resolve_checkpoint(DEFAULT_MODEL, default_cache_dir())
    spec = BaseModelSpec.from_hf_config(DEFAULT_MODEL, json.loads((checkpoint / "config.json").read_text()))
    signer, recipient = generate_signing_key(), generate_recipient_key()
    tmp = Path(tempfile.mkdtemp(prefix="tensafe-bench-cache-"))
    refs: dict[str, PackageRef] = {}

    def store(key: str, src: Path) -> None:
        data = pack(src, tenant="bench", name=key.replace("/", "-"), version="1", base_model=DEFAULT_MODEL,
                    signer=signer, recipient=recipient.public_key())
        path = tmp / f"{len(refs)}.tssp"
        path.write_bytes(data)
        refs[key] = PackageRef(tenant="bench", path=path, trusted_signers=(signer.public_key(),))

    async def lookup(key: str) -> PackageRef:
        try:
            return refs[key]
        except KeyError:
            raise UnknownAdapter(key) from None

    store("big", peft_dir(tmp / "big", spec, 16, MODULES, 0))
    print(f"packing {args.adapters} rank-4 adapters...", file=sys.stderr)
    small = peft_dir(tmp / "small", spec, 4, ("q_proj", "v_proj"), 1)
    for i in range(args.adapters):
        store(f"z{i}", small)
    source = TsspSource(lookup, lambda: [recipient], base_model=spec)
    backend = EmbeddedBackend(EngineConfig(model=str(checkpoint), max_num_seqs=32, max_model_len=256,
                                           max_loras=args.slots, max_lora_rank=16, max_queue=4096))
    await backend.start()
    engine = backend.engine
    # the gateway's wiring: the CPU tier keeps adapters in the engine's slot layout
    slots = BackendSlots(backend)
    cache = AdapterCache(source, cpu_budget_bytes=args.cpu_budget_mb * 2**20, tenant_share=1.0)
    cache.add_backend("embedded", slots)

    cold, warm = [], []
    for _ in range(args.repeats):
        cache.evict("big")
        await cache.offload("big", "embedded")
        t0 = time.perf_counter()
        await cache.load("big", "embedded")
        cold.append((time.perf_counter() - t0) * 1000)
        await cache.offload("big", "embedded")
        t0 = time.perf_counter()
        await cache.load("big", "embedded")
        warm.append((time.perf_counter() - t0) * 1000)
    await cache.offload("big", "embedded")
    cache.evict("big")

    rng = random.Random(0)
    weights = [1 / (i + 1) ** 1.1 for i in range(args.adapters)]
    zipf_keys = rng.choices([f"z{i}" for i in range(args.adapters)], weights=weights, k=args.requests)

    async def stream(keys: list[str]) -> float:
        sem = asyncio.Semaphore(32)
        sampling = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

        async def one(i: int, key: str) -> int:
            async with sem, cache.lease(key, "embedded"):
                req = GenerationRequest(request_id=f"{key}-{i}-{time.monotonic_ns()}", prompt="Tell me about the sea",
                                        sampling=sampling, adapter_id=key)
                return sum([len(c.token_ids) async for c in engine.generate(req)])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
        return sum(counts) / (time.perf_counter() - t0)

    settle_gc()  # as the gateway does once it is ready
    await stream(["z0"] * 32)  # warm-up
    single = await stream(["z0"] * args.requests)
    zipf = await stream(zipf_keys)
    stats = cache.stats()
    await backend.close()
    return {
        "cold_ms_p50": round(statistics.median(cold), 3), "cold_ms_p95": pct(cold, 0.95),
        "warm_ms_p50": round(statistics.median(warm), 3), "warm_ms_p95": pct(warm, 0.95),
        "warm_speedup": round(statistics.median(cold) / statistics.median(warm), 1),
        "zipf1000_vs_single": round(zipf / single, 3),
        "tok_per_s": {"single": round(single, 1), "zipf": round(zipf, 1)},
        "adapters": args.adapters, "requests": args.requests, "device_slots": args.slots,
        "cpu_budget_mb": args.cpu_budget_mb,
        "hit_rate": {"cpu": stats["cpu"]["hit_rate"], "device": stats["device"]["hit_rate"]},
        "fetches": stats["fetches"], "loads": stats["loads"], "offloads": stats["offloads"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--cpu-budget-mb", type=int, default=256)
    print(json.dumps(asyncio.run(main_async(ap.parse_args()))))


if __name__ == "__main__":
    main()
