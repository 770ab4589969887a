"""Plain data types of the engine's public API (no torch in signatures except adapter tensors)."""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Literal

#: Projections of a Llama decoder layer that a LoRA adapter may target.
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # aborted by the caller (disconnect, timeout, shutdown)


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None  # same seed, same prompt, same adapter -> same output
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks)
    min_tokens: int = 0  # no end-of-sequence, stop token or stop string before this many tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    stop_token_ids: tuple[int, ...] = ()  # these tokens end the completion too (not in its text)


@dataclasses.dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation. Exactly one of ``messages`` (chat template applied by the engine),
    ``prompt`` (raw text) or ``prompt_token_ids`` is set."""

    request_id: str
    sampling: SamplingParams = SamplingParams()
    messages: Sequence[ChatMessage] | None = None
    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    adapter_id: str | None = None  # None = the base model
    #: Prompt-prefix reuse only happens between requests with the same salt (the gateway uses
    #: the tenant), so timing cannot reveal another tenant's prompts.
    cache_salt: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationChunk:
    """What one engine step produced for one request. ``text``/``token_ids`` are deltas;
    the last chunk of a request carries ``finish_reason``."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int  # cumulative
    finish_reason: FinishReason | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterConfig:
    """What the engine needs to know about an adapter besides its tensors."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5) if self.use_rslora else self.alpha / self.rank


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    free_sequence_slots: int
    free_adapter_slots: int
    queue_depth: int
    max_sequence_slots: int = 0
    max_adapter_slots: int = 0
    max_queue: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    dtype: str
    device: str
