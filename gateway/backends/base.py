"""The Backend interface: what the gateway needs from anything that runs a model.

Implementations (the embedded engine, a null backend for overhead measurements, and later
vLLM and LoRAX servers) are reached only through this protocol. Requests are backend-neutral:
chat messages or a prompt, sampling parameters, an internal adapter id (never what a tenant
typed), a request id. Each backend applies its own model's chat template.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from adapters.lora import LoraConfig

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "abort"]


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int | None = None  # None = until end of sequence or the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class BackendRequest:
    """Exactly one of ``messages``, ``prompt`` or ``prompt_token_ids`` is set."""

    request_id: str
    sampling: Sampling
    messages: Sequence[Message] | None = None
    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    adapter_id: str | None = None  # internal handle; None = the base model
    cache_salt: str = ""  # prompt-prefix reuse only within one salt (the tenant)


@dataclasses.dataclass(frozen=True, slots=True)
class BackendChunk:
    """A text delta; ``completion_tokens`` is cumulative; the last chunk has ``finish_reason``."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    free_sequence_slots: int
    free_adapter_slots: int
    queue_depth: int
    max_sequence_slots: int
    max_adapter_slots: int
    max_lora_rank: int = 0  # the largest adapter rank a slot holds (0: not known)


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    model: str
    max_model_len: int
    detail: str = ""


@runtime_checkable
class Backend(Protocol):
    name: str

    async def start(self) -> None:
        """Load the model / connect; the gateway reports ready once this returns."""

    async def close(self) -> None:
        """Abort whatever still runs and release resources."""

    def generate(self, request: BackendRequest) -> AsyncIterator[BackendChunk]:
        """Stream the completion. Errors from :mod:`gateway.backends.errors` are raised by the
        first ``__anext__`` when the request is refused. Closing the iterator early aborts it."""

    def abort(self, request_id: str) -> None: ...

    def adapter_layout(self) -> str:
        """The name of the form ``prepare_adapter`` returns; backends of one layout share the
        CPU tier's prepared copy ("": the tensors as opened, no preparing)."""

    def prepare_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> Mapping[str, Any]:
        """Check an adapter and convert its tensors into the form ``load_adapter`` copies
        fastest (blocking: called off the event loop, once per CPU-cache fill of this layout).
        Raises AdapterProblem when the adapter cannot run here; a backend without a preferred
        layout returns ``tensors`` unchanged."""

    async def load_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> None: ...

    async def unload_adapter(self, adapter_id: str) -> None: ...

    def adapters(self) -> list[str]: ...

    async def health(self) -> Health: ...

    async def model_config(self) -> dict[str, Any] | None:
        """The served base model's Hugging Face ``config.json`` (adapters are validated
        against it), or None when the backend cannot tell."""

    def capacity(self) -> Capacity: ...
