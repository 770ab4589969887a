"""The ``vllm serve`` command line and environment the ``vllm`` settings make: printed by
``tensafe vllm-command``, run by the test fixtures and benchmarks, rendered into deploy/. The
API key is passed as ``VLLM_API_KEY`` (vLLM reads it), never on the command line."""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from ..settings import Settings


@dataclasses.dataclass(frozen=True)
class VllmCommand:
    argv: tuple[str, ...]  # starting with "vllm", "serve"
    env: dict[str, str]  # without the API key
    secret_env: tuple[str, ...]  # names of variables that must come from a secret

    def shell(self) -> str:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        lines += [f"export {name}=...  # from a secret (the vllm api_key setting)" for name in self.secret_env]
        return "\n".join(lines + [shlex.join(self.argv)])


def model_path(settings: Settings) -> str:
    """The checkpoint vLLM loads: ``vllm.model``, else the gateway's model (its converted
    directory when it names the default model)."""
    if settings.vllm.model:
        return settings.vllm.model
    if Path(settings.model).expanduser().is_dir():
        return str(Path(settings.model).expanduser())
    from engine.config import default_cache_dir
    from engine.model.checkpoint import resolve_checkpoint

    return str(resolve_checkpoint(settings.model, settings.model_cache or default_cache_dir()))


def vllm_command(settings: Settings, model: str | None = None) -> VllmCommand:
    v = settings.vllm
    argv = ["vllm", "serve", model or model_path(settings), "--host", v.host, "--port", str(v.port),
            "--served-model-name", v.served_model_name or settings.model_name, "--dtype", v.dtype,
            "--max-model-len", str(v.max_model_len), "--max-num-seqs", str(v.max_num_seqs),
            "--tensor-parallel-size", str(v.tensor_parallel_size),
            "--enable-lora", "--max-loras", str(v.max_loras), "--max-lora-rank", str(v.max_lora_rank),
            "--max-cpu-loras", str(v.max_cpu_loras or v.max_loras)]
    if v.device != "cpu":
        argv += ["--gpu-memory-utilization", str(v.gpu_memory_utilization)]
    if v.block_size:
        argv += ["--block-size", str(v.block_size)]
    argv += shlex.split(v.extra_args)
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if v.device == "cpu":
        env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(v.cpu_kvcache_space_gib)})
    return VllmCommand(tuple(argv), env, ("VLLM_API_KEY",) if v.api_key else ())
