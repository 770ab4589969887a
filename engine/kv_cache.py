"""The KV cache: one fixed buffer per layer, allocated once.

Layout per layer: ``[slots + 1, kv_heads, max_model_len, head_dim]``. A running sequence owns
one slot (row) for its whole life, so attention reads its keys in place (no gather, no paging
copies) and decode attends over a prefix of fixed rows. The extra last row is scratch: padding
tokens of a batched prefill write there, never into a live sequence.

Buffers are allocated uninitialised (start-up stays fast even for gigabytes of cache) and a
slot is zeroed the first time it is handed out: masked-out keys are multiplied by zero
probabilities, which must not meet NaN garbage.
"""
from __future__ import annotations

import torch

from .config import EngineConfig
from .model.weights import LlamaDims


def bytes_per_token(dims: LlamaDims, dtype: torch.dtype) -> int:
    return 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * torch.empty(0, dtype=dtype).element_size()


def plan_slots(config: EngineConfig, dims: LlamaDims, dtype: torch.dtype, max_model_len: int) -> int:
    """Number of sequence slots that fit the configured KV budget (at least 1)."""
    slots = config.max_num_seqs
    if config.kv_cache_mb is not None:
        per_seq = bytes_per_token(dims, dtype) * max_model_len
        slots = min(slots, (config.kv_cache_mb * 2**20) // per_seq)
        if slots < 1:
            raise ValueError(
                f"kv_cache_mb {config.kv_cache_mb} cannot hold one sequence of max_model_len "
                f"{max_model_len} ({per_seq / 2**20:.1f} MiB)"
            )
    return int(slots)


class KVCache:
    def __init__(self, dims: LlamaDims, slots: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots + 1, dims.num_kv_heads, max_len, dims.head_dim)
        self.slots = slots
        self.scratch = slots
        self.max_len = max_len
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(dims.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(dims.num_layers)]
        self._zeroed: set[int] = set()
        self.prepare(self.scratch)

    def prepare(self, slot: int) -> None:
        """Zero a slot's rows on first use."""
        if slot not in self._zeroed:
            for t in self.k + self.v:
                t[slot].zero_()
            self._zeroed.add(slot)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
