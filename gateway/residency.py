"""Glue between the cache and the rest: a Backend's adapter methods seen through the cache's
slot protocol, and the disk tier's lookup of a stored package in the registry."""
from __future__ import annotations

import dataclasses
import json

from cache import Decrypted, UnknownAdapter
from cache.tssp import PackageRef

from adapters.keys import SigningPublicKey

from .backends import Backend, LoraConfig
from .blobs import BlobStore
from .store import Store
from .store.types import SigningKeyRecord


def _config(adapter: Decrypted) -> LoraConfig:
    s = adapter.spec
    return LoraConfig(s.rank, s.alpha, s.target_modules, s.use_rslora)


class BackendSlots:
    """``cache.SlotBackend`` over any Backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def prepare(self, adapter: Decrypted) -> Decrypted:
        """The cache's ``prepare`` hook: keep adapters in the CPU tier in the backend's own
        layout (for the embedded engine: stacked in its dtype), so a warm load is a plain copy."""
        tensors = self.backend.prepare_adapter(adapter.key, adapter.tensors, _config(adapter))
        if tensors is adapter.tensors:
            return adapter
        nbytes = getattr(tensors, "nbytes", None)  # a prepared layout knows its size: no walk over views
        if nbytes is None:
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return dataclasses.replace(adapter, tensors=tensors, nbytes=nbytes)

    async def load(self, key: str, adapter: Decrypted) -> None:
        await self.backend.load_adapter(key, adapter.tensors, _config(adapter))

    async def unload(self, key: str) -> None:
        await self.backend.unload_adapter(key)

    def resident(self) -> set[str]:
        return set(self.backend.adapters())

    def free_slots(self) -> int:
        return self.backend.capacity().free_adapter_slots


def signing_public(record: SigningKeyRecord) -> SigningPublicKey:
    pems = json.loads(record.public)
    return SigningPublicKey.from_pems(pems["ed25519_pem"].encode(), pems["mldsa_pem"].encode())


def split_key(key: str) -> tuple[str, str, str]:
    """``tenant/name@version`` -> parts."""
    tenant, _, rest = key.partition("/")
    name, _, version = rest.rpartition("@")
    return tenant, name, version


class StoredPackages:
    """The disk tier's lookup: adapter key -> stored package and its tenant's signing keys.
    Keys revoked after an upload still verify packages they signed before (revocation stops
    new uploads; an operator deletes adapters that must go)."""

    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self.store = store
        self.blobs = blobs

    async def __call__(self, key: str) -> PackageRef:
        tenant, name, version = split_key(key)
        record = await self.store.get_adapter(tenant, name)
        if record is None or record.version != version:
            raise UnknownAdapter(key)
        signers = await self.store.list_signing_keys(tenant, include_revoked=True)
        return PackageRef(tenant, self.blobs.path(record.blob), tuple(signing_public(s) for s in signers))
