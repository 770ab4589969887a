"""The shape of a LoRA adapter, as everything above the engine sees it: its rank, alpha, the
projections it adapts and whether it scales by rsLoRA's rule. One type for the package format,
the cache and every backend (the engine, which imports nothing of ours, keeps its own)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoraConfig:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        """What LoRA multiplies ``B @ A`` by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
