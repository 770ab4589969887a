"""Reading PEFT LoRA output (``adapter_config.json`` + ``adapter_model.safetensors``).

Only plain LoRA on the Llama projections is accepted. Every PEFT feature that changes what
the tensors mean at inference time (DoRA, extra saved modules, biases, per-layer ranks, ...)
is refused by name rather than silently ignored: serving such an adapter as plain LoRA would
give wrong outputs. Pickle files (``adapter_model.bin``) are never opened.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .errors import InvalidAdapter
from .limits import Limits
from .lora import LoraConfig
from .validate import validate_adapter

__all__ = ["LoraConfig", "read_peft_dir", "lora_config", "validate_adapter", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_MAX_CONFIG_BYTES = 1024 * 1024

# Keys that do not change inference with the saved tensors (training or init settings, metadata).
_IGNORED = frozenset({
    "task_type", "inference_mode", "lora_dropout", "revision", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "layers_pattern",
    "base_model_name_or_path", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "init_lora_weights",
})
# Feature keys, with the value that means "off" and why we refuse anything else.
_MUST_BE_OFF: dict[str, str] = {
    "use_dora": "DoRA (use_dora) is not supported",
    "modules_to_save": "modules_to_save is not supported: the adapter would replace whole modules",
    "layers_to_transform": "layers_to_transform is not supported: adapt every layer",
    "rank_pattern": "rank_pattern is not supported: use one rank for every module",
    "alpha_pattern": "alpha_pattern is not supported: use one lora_alpha for every module",
    "fan_in_fan_out": "fan_in_fan_out is not supported (Conv1D-style weights)",
    "lora_bias": "lora_bias is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "megatron_config": "megatron_config is not supported",
    "layer_replication": "layer_replication is not supported: it changes the base model",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters is not supported: target modules only",
    "exclude_modules": "exclude_modules is not supported: adapt every layer",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "arrow_config": "arrow_config is not supported",
    "use_bdlora": "use_bdlora is not supported",
}
# init_lora_weights values that rewrite the base weights: the adapter needs a converted copy.
_BASE_ALTERING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _refuse_unsupported(data: Mapping[str, Any]) -> None:
    if data.get("peft_type") != "LORA":
        raise InvalidAdapter(f"peft_type {data.get('peft_type')!r} is not supported: only LORA")
    if data.get("bias", "none") != "none":
        raise InvalidAdapter(f"bias {data.get('bias')!r} is not supported: only \"none\"")
    for key, why in _MUST_BE_OFF.items():
        if not _is_off(data.get(key)):
            raise InvalidAdapter(f"{why} ({key} = {_short(data[key])})")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_ALTERING_INITS):
        raise InvalidAdapter(f"init_lora_weights {init!r} changes the base weights; convert "
                             "the adapter to plain LoRA before packing")
    for key in sorted(set(data) - _IGNORED - set(_MUST_BE_OFF) - {"bias"}):
        if not _is_off(data[key]):
            raise InvalidAdapter(
                f"unknown PEFT setting {key!r} = {_short(data[key])} is not supported")


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise InvalidAdapter(f"{what} is {size} bytes, above the limit of {limit}")
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise InvalidAdapter(f"{path.parent} has no {path.name}") from None
    except OSError as exc:
        raise InvalidAdapter(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise InvalidAdapter(f"{what} is larger than the limit of {limit} bytes")
    return data


def lora_config(data: Mapping[str, Any]) -> LoraConfig:
    """The LoRA an ``adapter_config.json`` describes; refuses unsupported features by name."""
    if not isinstance(data, Mapping):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    _refuse_unsupported(data)
    r, alpha, modules = data.get("r"), data.get("lora_alpha"), data.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidAdapter(f"r must be a positive integer, got {r!r}")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha) or alpha <= 0):
        raise InvalidAdapter(f"lora_alpha must be a positive number, got {alpha!r}")
    if isinstance(modules, str):
        raise InvalidAdapter(f"target_modules {modules!r} is a pattern; list module names")
    if (not isinstance(modules, list) or not modules
            or not all(isinstance(m, str) for m in modules)):
        raise InvalidAdapter(
            f"target_modules must be a non-empty list of names, got {modules!r}")
    rslora = data.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InvalidAdapter(f"use_rslora must be true or false, got {rslora!r}")
    return LoraConfig(r, alpha, tuple(sorted(set(modules))), rslora)


def peft_config(config: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    """A PEFT-compatible ``adapter_config.json`` body for ``config`` (PEFT fills other keys
    with defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank,
        "lora_alpha": config.alpha, "target_modules": list(config.target_modules),
        "use_rslora": config.use_rslora, "lora_dropout": 0.0, "bias": "none",
        "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
        "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model,
    }


def read_peft_dir(path: str | os.PathLike[str], limits: Limits = Limits()
                  ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read a ``save_pretrained`` directory. Checks the config; call ``validate_adapter`` to
    check the tensors (``pack`` does)."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidAdapter(f"{root} is not a directory")
    weights = root / WEIGHTS_FILE
    if not weights.exists():
        pickles = [p for p in _PICKLE_FILES if (root / p).exists()]
        if pickles:
            raise InvalidAdapter(f"{root} holds {pickles[0]} (pickle), which is never loaded; "
                                 f"save with safe_serialization=True to get {WEIGHTS_FILE}")
        raise InvalidAdapter(f"{root} has no {WEIGHTS_FILE}")
    raw_config = _read_bounded(root / CONFIG_FILE, _MAX_CONFIG_BYTES, CONFIG_FILE)
    try:
        config_dict = json.loads(raw_config)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    config = lora_config(config_dict)
    raw = _read_bounded(weights, limits.max_payload_bytes, WEIGHTS_FILE)
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    return config, tensors
