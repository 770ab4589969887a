"""Per-request state owned by the engine's step thread."""
from __future__ import annotations

import asyncio
import dataclasses
import enum

import torch
from tokenizers.decoders import DecodeStream

from .stops import StopMatcher
from .types import GenerationRequest


class Phase(enum.Enum):
    WAITING = "waiting"  # no slot yet
    PREFILL = "prefill"  # prompt (partly) not yet in the cache
    DECODE = "decode"  # generating
    DONE = "done"


@dataclasses.dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    prompt_ids: list[int]
    adapter_slot: int  # -1 = base model
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: DecodeStream
    stops: StopMatcher
    generator: torch.Generator | None
    phase: Phase = Phase.WAITING
    slot: int = -1
    computed: int = 0  # tokens whose keys/values are in the cache
    output_ids: list[int] = dataclasses.field(default_factory=list)
    #: the tokens of the prompt and the output so far, as a vocabulary mask (repetition penalty)
    seen: torch.Tensor | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def next_token(self) -> int:
        return self.output_ids[-1]
