"""Builders for test adapters: PEFT-format directories written with safetensors directly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapters.base_model import BaseModelSpec
from adapters.validate import lora_tensor_name

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2 = BaseModelSpec(SMOLLM2_ID, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, head_dim=64)
# The same dimensions cut to two layers: small packages for exhaustive tamper tests.
SMOLLM2_2L = BaseModelSpec("smollm2-2-layers", 576, 1536, 2, 9, 3, 64)
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_config(r: int, modules: tuple[str, ...], alpha: float = 16, **extra: Any) -> dict[str, Any]:
    """An ``adapter_config.json`` body as PEFT writes it (the keys that matter, plus noise)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": list(modules), "lora_dropout": 0.05, "bias": "none",
        "use_dora": False, "use_rslora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "init_lora_weights": True, "base_model_name_or_path": SMOLLM2_ID,
        "peft_version": "0.21.2", "revision": None, "megatron_config": None,
        "megatron_core": "megatron.core", "loftq_config": {}, **extra,
    }


def lora_tensors(base: BaseModelSpec, r: int, modules: tuple[str, ...],
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(base.num_hidden_layers):
        for module in modules:
            in_f, out_f = base.projection_shape(module)
            out[lora_tensor_name(layer, module, "A")] = torch.randn(r, in_f, generator=gen).to(dtype)
            out[lora_tensor_name(layer, module, "B")] = torch.randn(out_f, r, generator=gen).to(dtype)
    return out


def write_peft_dir(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def small_adapter_dir(path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Rank 4 on q/v for 2 layers (8 tensors): the small package of the tamper tests."""
    modules = ("q_proj", "v_proj")
    return write_peft_dir(path, peft_config(4, modules, alpha=8), lora_tensors(SMOLLM2_2L, 4, modules, dtype))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Reinterpret as integers so equality is bit for bit (NaN and -0.0 included)."""
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


def seal(manifest_bytes: bytes, plaintext: bytes, signer, recipient_public,
         alter_wrapped_key=None) -> bytes:
    """Assemble a correctly signed and encrypted package from arbitrary parts, the way a
    third-party packer following SPEC.md would: lets tests reach the checks behind the
    signatures (limits, digest, payload parsing)."""
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from adapters import format as fmt
    from adapters.hybrid_kem import wrap_data_key
    from adapters.signatures import sign

    header = fmt.Header(signer_key_id=bytes.fromhex(signer.key_id),
                        recipient_key_id=bytes.fromhex(recipient_public.key_id),
                        manifest_length=len(manifest_bytes), payload_length=len(plaintext))
    key, nonce = os.urandom(32), os.urandom(12)
    wrapped = wrap_data_key(key, recipient_public)
    if alter_wrapped_key is not None:
        wrapped = alter_wrapped_key(wrapped)
    sealed = AESGCM(key).encrypt(nonce, plaintext, header.encode() + manifest_bytes)
    ed, ml = sign(signer, fmt.signed_message(header.encode(), manifest_bytes, wrapped, nonce, sealed[-16:]))
    return fmt.assemble(header, manifest_bytes, wrapped, nonce, sealed, ed, ml)
