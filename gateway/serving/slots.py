"""A Backend's adapter methods seen through the cache's slot protocol."""
from __future__ import annotations

import dataclasses

from cache import Decrypted

from ..backends import Backend, LoraConfig


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
