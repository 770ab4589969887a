"""What the cache moves between tiers, and the two small protocols it is given: where packages
come from (the disk tier) and how a backend's device slots are reached (the device tier)."""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, Protocol

from adapters.lora import LoraConfig


class Tier(str, enum.Enum):
    DISK = "disk"
    CPU = "cpu"
    DEVICE = "device"


class State(str, enum.Enum):
    ON_DISK = "on_disk"
    FETCHING = "fetching"  # disk -> CPU: verify + decrypt
    IN_CPU = "in_cpu"
    LOADING = "loading"  # CPU -> slot
    IN_SLOT = "in_slot"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class Decrypted:
    """An adapter opened from its package: plain tensors in RAM, never on disk."""

    key: str
    tenant: str
    lora: LoraConfig
    tensors: Mapping[str, Any]  # name -> torch.Tensor
    nbytes: int


class AdapterSource(Protocol):
    """The disk tier: packages as uploaded (encrypted), opened on promotion."""

    async def open(self, key: str) -> Decrypted:
        """Read, verify and decrypt the package of ``key`` (off the event loop)."""


class SlotBackend(Protocol):
    """A backend's device slots, as the cache sees them (the gateway adapts each Backend).

    ``layout`` names the form ``load`` copies fastest ("" = the adapter as opened); backends of
    one layout share the CPU tier's copy in it. ``prepare`` (blocking, run off the event loop)
    turns an opened adapter into that form, or raises to refuse it; it is never called for
    layout ""."""

    layout: str

    def prepare(self, adapter: Decrypted) -> Decrypted: ...

    async def load(self, key: str, adapter: Decrypted) -> None: ...

    async def unload(self, key: str) -> None: ...

    def resident(self) -> set[str]: ...

    def free_slots(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class AdapterStatus:
    key: str
    state: State
    tiers: tuple[Tier, ...]  # where it is now (DISK always, while registered)
    backends: tuple[str, ...]  # backends holding it in a slot
    pinned: bool
    nbytes: int | None
    reason: str | None = None  # why it failed
