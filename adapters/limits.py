"""Bounds applied to packages and adapters before anything is allocated or trusted."""
from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Limits:
    """Upper bounds for one package / adapter.

    The defaults admit an adapter on all seven projections of a model with up to 146 layers
    (the manifest lists every tensor, ~110 bytes each) and payloads up to 256 MiB (rank 32 on
    all projections of a Llama-8B is ~170 MB in bf16), while keeping a hostile upload from
    making the gateway allocate more than ``max_payload_bytes`` once.
    """

    max_manifest_bytes: int = 256 * KIB
    max_payload_bytes: int = 256 * MIB
    max_rank: int = 64
    max_tensors: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_manifest_bytes", "max_payload_bytes", "max_rank", "max_tensors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
