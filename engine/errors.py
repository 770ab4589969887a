"""Errors raised by the embedded engine.

Hierarchy::

    EngineError
    ├── EngineOverloaded        the bounded wait queue is full (the gateway answers 503)
    ├── EngineClosed            the engine is shutting down or has stopped
    ├── InvalidRequest          a request the engine can never serve
    │   └── ContextLengthExceeded   prompt + max_tokens beyond the context window
    ├── ModelLoadError          a checkpoint that cannot be found, converted or loaded
    └── AdapterError
        ├── AdapterNotFound     no resident adapter with that id
        ├── AdapterSlotsFull    every adapter slot is taken
        ├── AdapterRankTooLarge rank above the configured maximum
        ├── AdapterInUse        unload refused while requests still use the adapter
        ├── AdapterExists       an adapter with that id is already resident
        └── InvalidAdapter      tensors or config that do not fit the base model

Exceptions carry their data as attributes so callers never parse messages.
"""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class EngineOverloaded(EngineError):
    def __init__(self, queue_depth: int, max_queue: int) -> None:
        self.queue_depth = queue_depth
        self.max_queue = max_queue
        super().__init__(f"engine overloaded: {queue_depth} requests already waiting (max_queue {max_queue})")


class EngineClosed(EngineError):
    def __init__(self) -> None:
        super().__init__("engine is shut down")


class InvalidRequest(EngineError):
    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class ContextLengthExceeded(InvalidRequest):
    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the context "
            f"length {max_model_len}",
            param="max_tokens" if prompt_tokens < max_model_len else "messages",
        )


class ModelLoadError(EngineError):
    pass


class AdapterError(EngineError):
    def __init__(self, message: str, adapter_id: str) -> None:
        self.adapter_id = adapter_id
        super().__init__(message)


class AdapterNotFound(AdapterError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter {adapter_id!r} is not loaded", adapter_id)


class AdapterSlotsFull(AdapterError):
    def __init__(self, adapter_id: str, slots: int) -> None:
        self.slots = slots
        super().__init__(f"cannot load adapter {adapter_id!r}: all {slots} adapter slots are in use", adapter_id)


class AdapterRankTooLarge(AdapterError):
    def __init__(self, adapter_id: str, rank: int, max_rank: int) -> None:
        self.rank = rank
        self.max_rank = max_rank
        super().__init__(f"adapter {adapter_id!r}: rank {rank} exceeds max_lora_rank {max_rank}", adapter_id)


class AdapterInUse(AdapterError):
    def __init__(self, adapter_id: str, users: int) -> None:
        self.users = users
        super().__init__(f"adapter {adapter_id!r} is used by {users} request(s); unload refused", adapter_id)


class AdapterExists(AdapterError):
    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter {adapter_id!r} is already loaded", adapter_id)


class InvalidAdapter(AdapterError):
    pass
