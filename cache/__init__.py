"""Tiered adapter cache: disk (encrypted TSSP packages) -> CPU (decrypted tensors under a byte
budget) -> device (backend slots), with single-flight loads, pinning and per-tenant shares."""
from .errors import AdapterBusy, AdapterPinned, AdapterUnavailable, BudgetExceeded, CacheError, UnknownAdapter
from .lru import ByteLRU
from .tiered import AdapterCache
from .types import AdapterSource, AdapterStatus, Decrypted, SlotBackend, State, Tier

__all__ = [
    "AdapterBusy", "AdapterPinned", "AdapterUnavailable", "BudgetExceeded", "CacheError", "UnknownAdapter",
    "ByteLRU", "AdapterCache", "AdapterSource", "AdapterStatus", "Decrypted", "SlotBackend", "State",
    "Tier",
]
