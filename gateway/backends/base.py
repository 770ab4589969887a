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


#: Sampling parameters beyond OpenAI's (vLLM's names and meanings). A backend lists those it
#: honours in ``Backend.extensions``; a request that uses one goes only to backends that do.
EXTENSIONS = frozenset({"ignore_eos", "min_tokens", "top_k", "repetition_penalty", "stop_token_ids"})


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int | None = None  # None = until end of sequence or the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-sequence
    min_tokens: int = 0  # no end-of-sequence, stop token or stop string before this many tokens
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    stop_token_ids: tuple[int, ...] = ()

    def extensions(self) -> frozenset[str]:
        """The extensions this request uses (those away from their neutral value)."""
        used = set()
        if self.ignore_eos:
            used.add("ignore_eos")
        if self.min_tokens:
            used.add("min_tokens")
        if self.top_k:
            used.add("top_k")
        if self.repetition_penalty != 1.0:
            used.add("repetition_penalty")
        if self.stop_token_ids:
            used.add("stop_token_ids")
        return frozenset(used)


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


@dataclasses.dataclass(frozen=True, slots=True)
class Tokens:
    ids: list[int]
    strings: list[str] | None = None  # the tokens' own strings, when asked for


@runtime_checkable
class Backend(Protocol):
    name: str
    #: the members of ``EXTENSIONS`` this backend honours
    extensions: frozenset[str]

    async def start(self) -> None:
        """Load the model / connect; the gateway reports ready once this returns."""

    async def close(self) -> None:
        """Abort whatever still runs and release resources."""

    def generate(self, request: BackendRequest) -> AsyncIterator[BackendChunk]:
        """Stream the completion. Errors from :mod:`gateway.backends.errors` are raised by the
        first ``__anext__`` when the request is refused. The first chunk may be an *acceptance*
        (no text, ``completion_tokens`` 0, no finish reason), sent once the backend has accepted
        the request, before its first token. Closing the iterator early aborts it."""

    async def tokenize(self, *, prompt: str | None = None, messages: Sequence[Message] | None = None,
                       add_special_tokens: bool = False, add_generation_prompt: bool = True,
                       with_strings: bool = False) -> Tokens:
        """The base model's token ids for ``prompt`` (or ``messages`` under its chat template).
        BadRequest for bad input; Unsupported when this backend cannot tokenize."""

    async def detokenize(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included."""

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
