"""Real TSSP packages on disk, a real engine's slots (through the gateway's own slot adapter
over the embedded backend), and the cache between them."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapters.keys import generate_recipient_key, generate_signing_key
from adapters.package import pack
from cache import AdapterCache, UnknownAdapter
from cache.tssp import PackageRef, TsspSource
from engine import Engine, EngineConfig
from gateway.backends.embedded import EmbeddedBackend
from gateway.serving.slots import BackendSlots
from tests.adapters.builders import SMOLLM2, SMOLLM2_ID, lora_tensors, peft_config, write_peft_dir


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


@pytest.fixture()
def engine(small_engine: Engine) -> Engine:
    return small_engine


@pytest.fixture()
def slots(engine: Engine) -> BackendSlots:
    return BackendSlots(EmbeddedBackend(EngineConfig(), engine=engine))


ADAPTER_BYTES = 30 * (4 * 576 + 576 * 4) * 2  # rank 4, q_proj, 30 layers, bf16


@pytest.fixture()
def cache(source: TsspSource, slots: EngineSlots):
    c = AdapterCache(source, cpu_budget_bytes=4 * ADAPTER_BYTES, tenant_share=0.75)
    c.add_backend("embedded", slots)
    return c
