"""Real TSSP packages on disk, a real engine's slots, and the cache between them."""
from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from adapters.keys import generate_recipient_key, generate_signing_key
from adapters.package import pack
from cache import AdapterCache, Decrypted, UnknownAdapter
from cache.tssp import PackageRef, TsspSource
from engine import AdapterConfig, Engine, EngineConfig
from tests.adapters.builders import SMOLLM2, SMOLLM2_ID, lora_tensors, peft_config, write_peft_dir


def _config(adapter: Decrypted) -> AdapterConfig:
    s = adapter.spec
    return AdapterConfig(rank=s.rank, alpha=s.alpha, target_modules=s.target_modules, use_rslora=s.use_rslora)


class EngineSlots:
    """The engine's adapter API seen through the cache's slot protocol (what the gateway's
    backend adapter does for every backend)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.load_calls = 0

    def prepare(self, adapter: Decrypted) -> Decrypted:
        tensors = self.engine.prepare_adapter(adapter.key, adapter.tensors, _config(adapter))
        return dataclasses.replace(adapter, tensors=tensors, nbytes=tensors.nbytes)

    async def load(self, key: str, adapter: Decrypted) -> None:
        self.load_calls += 1
        await asyncio.to_thread(self.engine.load_adapter, key, adapter.tensors, _config(adapter))

    async def unload(self, key: str) -> None:
        self.engine.unload_adapter(key)

    def resident(self) -> set[str]:
        return set(self.engine.adapters())

    def free_slots(self) -> int:
        return self.engine.capacity().free_adapter_slots


class Registry:
    """Adapter key -> stored package, as the gateway's store would answer."""

    def __init__(self) -> None:
        self.refs: dict[str, PackageRef] = {}
        self.lookups = 0

    async def lookup(self, key: str) -> PackageRef:
        self.lookups += 1
        try:
            return self.refs[key]
        except KeyError:
            raise UnknownAdapter(key) from None


@pytest.fixture(scope="session")
def keys():
    return {"recipient": generate_recipient_key(), "a": generate_signing_key(), "b": generate_signing_key()}


@pytest.fixture(scope="session")
def packages(tmp_path_factory, keys) -> dict[str, tuple[str, Path]]:
    """Six small adapters (rank 4 on q_proj) of tenants a and b, sealed and stored."""
    root = tmp_path_factory.mktemp("blobs")
    out = {}
    for i in range(6):
        tenant = "a" if i < 4 else "b"
        src = write_peft_dir(root / f"src{i}", peft_config(4, ("q_proj",), alpha=8),
                             lora_tensors(SMOLLM2, 4, ("q_proj",), seed=i))
        data = pack(src, tenant=tenant, name=f"ad{i}", version="1", base_model=SMOLLM2_ID,
                    signer=keys[tenant], recipient=keys["recipient"].public_key())
        path = root / f"{tenant}-ad{i}.tssp"
        path.write_bytes(data)
        out[f"{tenant}/ad{i}"] = (tenant, path)
    return out


@pytest.fixture()
def registry(packages, keys) -> Registry:
    reg = Registry()
    for key, (tenant, path) in packages.items():
        reg.refs[key] = PackageRef(tenant=tenant, path=path, trusted_signers=(keys[tenant].public_key(),))
    return reg


@pytest.fixture()
def source(registry: Registry, keys) -> TsspSource:
    return TsspSource(registry.lookup, lambda: [keys["recipient"]], base_model=SMOLLM2)


@pytest.fixture(scope="session")
def engine(checkpoint: Path):
    e = Engine(EngineConfig(model=str(checkpoint), max_num_seqs=4, max_model_len=128, max_loras=2, max_lora_rank=8))
    e.start()
    yield e
    e.shutdown()


@pytest.fixture()
def slots(engine: Engine):
    for aid in engine.adapters():
        engine.unload_adapter(aid)
    return EngineSlots(engine)


ADAPTER_BYTES = 30 * (4 * 576 + 576 * 4) * 2  # rank 4, q_proj, 30 layers, bf16


@pytest.fixture()
def cache(source: TsspSource, slots: EngineSlots):
    c = AdapterCache(source, cpu_budget_bytes=4 * ADAPTER_BYTES, tenant_share=0.75)
    c.add_backend("embedded", slots)
    return c
