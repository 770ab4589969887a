"""TenSafe's embedded multi-LoRA inference engine (Llama architecture, CPU or CUDA).

Knows nothing of tenants, HTTP or packages: adapters arrive as plain tensors.
"""
from .config import DEFAULT_MODEL, EngineConfig, default_cache_dir
from .delta import DeltaGenerator, DeltaHook
from .engine import Engine
from .errors import (
    AdapterError,
    AdapterExists,
    AdapterInUse,
    AdapterNotFound,
    AdapterRankTooLarge,
    AdapterSlotsFull,
    ContextLengthExceeded,
    EngineClosed,
    EngineError,
    EngineOverloaded,
    InvalidAdapter,
    InvalidRequest,
    ModelLoadError,
)
from .lora import StackedLora
from .threads import confine, confined
from .types import (
    LORA_TARGETS,
    AdapterConfig,
    Capacity,
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
)

__all__ = [
    "DEFAULT_MODEL", "EngineConfig", "Engine", "AdapterError", "AdapterExists", "AdapterInUse",
    "AdapterNotFound", "AdapterRankTooLarge", "AdapterSlotsFull", "ContextLengthExceeded", "EngineClosed",
    "EngineError", "EngineOverloaded", "InvalidAdapter", "InvalidRequest", "ModelLoadError", "LORA_TARGETS",
    "AdapterConfig", "Capacity", "ChatMessage", "FinishReason", "GenerationChunk", "GenerationRequest",
    "ModelInfo", "SamplingParams", "StackedLora", "default_cache_dir", "DeltaGenerator", "DeltaHook",
    "confine", "confined",
]
