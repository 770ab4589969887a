"""Many registered adapters under a Zipf request stream through the gateway: every request
succeeds while the CPU tier and the backend slots stay within their budgets."""
from __future__ import annotations

import asyncio
import random

import pytest

from adapters.keys import current_recipient_from_document
from adapters.package import pack
from tests.adapters.builders import SMOLLM2, lora_tensors

from .test_tenancy import ADMIN, CHAT, HELLO, World, running

pytestmark = pytest.mark.slow
ADAPTERS = 1000
REQUESTS = 600


async def test_zipf_stream_over_many_adapters_stays_in_budget(tmp_path):
    from adapters.peft import lora_config

    async with running(tmp_path, max_loras=8, cpu_cache_mb=2, tenant_cache_share=1.0) as (app, client):
        w = World(client, app, tmp_path)
        w.recipient = current_recipient_from_document((await client.get("/v1/tssp/recipient")).json())
        await w.setup_tenant("z", quotas={})
        config = lora_config({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
        for i in range(ADAPTERS):
            data = pack((config, lora_tensors(SMOLLM2, 2, ("q_proj",), seed=i)), tenant="z", name=f"m{i}",
                        version="1", base_model="smollm2-135m-instruct", signer=w.signers["z"],
                        recipient=w.recipient)
            assert (await w.upload("z", data)).status_code == 201
        rng = random.Random(0)
        weights = [1 / (rank + 1) ** 1.1 for rank in range(ADAPTERS)]
        names = rng.choices([f"m{i}" for i in range(ADAPTERS)], weights, k=REQUESTS)
        gate = asyncio.Semaphore(16)

        async def one(name: str) -> int:
            async with gate:
                r = await client.post(CHAT, json={"model": name, "messages": HELLO, "max_tokens": 2},
                                      headers=w.h("z"))
                return r.status_code

        codes = await asyncio.gather(*(one(n) for n in names))
        assert codes.count(200) == REQUESTS
        stats = (await client.get("/admin/cache", headers={"authorization": f"Bearer {ADMIN}"})).json()
        assert stats["cpu"]["bytes"] <= stats["cpu"]["budget_bytes"] == 2 << 20
        assert len(app.state.gateway.backend.adapters()) <= 8
        assert stats["device"]["hits"] + stats["device"]["misses"] >= REQUESTS  # a lease may retry a load
        assert 0.05 < stats["device"]["hit_rate"] < 1.0 and stats["cpu"]["evictions"] > 0
        print({"cpu_hit_rate": stats["cpu"]["hit_rate"], "device_hit_rate": stats["device"]["hit_rate"],
               "fetches": stats["fetches"], "loads": stats["loads"]})
