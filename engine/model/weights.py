"""Llama weights, read from safetensors and re-laid out for fast inference.

q/k/v are fused into one projection and gate/up into another, so a decoder layer runs four
matmuls instead of seven; the embedding is shared with the LM head when the checkpoint ties them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelLoadError


@dataclasses.dataclass(frozen=True)
class LlamaDims:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a decoder-layer projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]

    @classmethod
    def from_config(cls, cfg: dict) -> "LlamaDims":
        arch = cfg.get("architectures") or []
        if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
            raise ModelLoadError(f"only Llama-architecture checkpoints are supported, got {cfg.get('model_type')!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ModelLoadError(f"checkpoints with {flag}=true are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
        heads = cfg["num_attention_heads"]
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


@dataclasses.dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


@dataclasses.dataclass
class LlamaWeights:
    dims: LlamaDims
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor


def load_weights(checkpoint: Path, dtype: torch.dtype, device: torch.device) -> LlamaWeights:
    cfg = json.loads((checkpoint / "config.json").read_text())
    dims = LlamaDims.from_config(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)

    def take(name: str) -> torch.Tensor:
        try:
            t = tensors.pop(name)
        except KeyError:
            raise ModelLoadError(f"{checkpoint}: tensor {name!r} is missing") from None
        return t.to(device=device, dtype=dtype)

    layers = []
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([take(p + f"self_attn.{m}_proj.weight") for m in "qkv"], 0)
        gate_up = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0)
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=qkv.contiguous(),
                o=take(p + "self_attn.o_proj.weight"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=gate_up.contiguous(),
                down=take(p + "mlp.down_proj.weight"),
            )
        )
    embed = take("model.embed_tokens.weight")
    lm_head = embed if dims.tie_word_embeddings or "lm_head.weight" not in tensors else take("lm_head.weight")
    norm = take("model.norm.weight")
    tensors.pop("lm_head.weight", None)
    leftover = [n for n in tensors if not n.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ModelLoadError(f"{checkpoint}: unexpected tensors, e.g. {leftover[:3]}")
    return LlamaWeights(dims=dims, embed=embed, layers=layers, norm=norm, lm_head=lm_head)
