"""A Backend's adapter methods seen through the cache's slot protocol."""
from __future__ import annotations

import dataclasses

from cache import AdapterBusy, AdapterUnavailable, Decrypted

from ..backends import Backend
from ..backends.errors import AdapterProblem, BackendError


class BackendSlots:
    """``cache.SlotBackend`` over any Backend. Its layout is the backend's
    (``Backend.adapter_layout``): the CPU tier keeps each adapter prepared once per layout."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.layout = backend.adapter_layout()

    def prepare(self, adapter: Decrypted) -> Decrypted:
        """The backend's own form of ``adapter`` (for the embedded engine: stacked in its dtype),
        so a warm load is a plain copy."""
        tensors = self.backend.prepare_adapter(adapter.key, adapter.tensors, adapter.lora)
        if tensors is adapter.tensors:
            return adapter
        nbytes = getattr(tensors, "nbytes", None)  # a prepared layout knows its size: no walk over views
        if nbytes is None:
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return dataclasses.replace(adapter, tensors=tensors, nbytes=nbytes)

    async def load(self, key: str, adapter: Decrypted) -> None:
        """Into a slot; an adapter the backend holds already (another gateway replica, or this
        one before a restart, loaded it: a key names one immutable version) is adopted."""
        try:
            await self.backend.load_adapter(key, adapter.tensors, adapter.lora)
        except AdapterProblem as exc:
            if exc.kind != "exists":
                raise AdapterUnavailable(key, str(exc)) from None
        except BackendError as exc:  # the adapter cannot run on this backend (its rank, say)
            raise AdapterUnavailable(key, str(exc)) from None

    async def unload(self, key: str) -> None:
        """Out of its slot; gone already is fine, in use (by another gateway replica's
        requests) is ``AdapterBusy``: the cache evicts something else."""
        try:
            await self.backend.unload_adapter(key)
        except AdapterProblem as exc:
            if exc.kind == "in_use":
                raise AdapterBusy(key, self.backend.name, 0) from None
            if exc.kind != "not_found":
                raise

    def resident(self) -> set[str]:
        return set(self.backend.adapters())

    def free_slots(self) -> int:
        return self.backend.capacity().free_adapter_slots
