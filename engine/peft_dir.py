"""Read a PEFT LoRA output directory into the engine's plain inputs (for the CLI and
benchmarks; the gateway gets adapters through verified packages instead)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import InvalidAdapter
from .types import AdapterConfig


def load_peft_dir(path: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise InvalidAdapter(f"{path} is not a PEFT LoRA directory (adapter_config.json and "
                             "adapter_model.safetensors needed)", str(path))
    cfg = json.loads(cfg_file.read_text())
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise InvalidAdapter(f"{path}: target_modules as a regular expression is not supported", str(path))
    config = AdapterConfig(
        rank=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
        target_modules=tuple(sorted(targets)), use_rslora=bool(cfg.get("use_rslora", False)),
    )
    return config, load_file(str(weights))
