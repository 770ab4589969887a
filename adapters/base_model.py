"""What we need to know about a base model to check an adapter's shapes against it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BaseModelConfigError

# LoRA target modules of the Llama architecture, with the submodule that holds each.
MODULE_PARENTS: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
SUPPORTED_MODULES = tuple(MODULE_PARENTS)


def _positive_int(config: Mapping[str, Any], key: str, model_id: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BaseModelConfigError(
            f"base model {model_id}: config field {key!r} must be a positive integer, "
            f"got {value!r}")
    return value


@dataclass(frozen=True)
class BaseModelSpec:
    """Dimensions of a Llama-architecture base model (the ones LoRA shapes depend on)."""

    model_id: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, model_id: str, config: Mapping[str, Any]) -> BaseModelSpec:
        """Build from a Hugging Face ``config.json`` dict (``head_dim`` and
        ``num_key_value_heads`` default as transformers defaults them)."""
        if not isinstance(config, Mapping):
            raise BaseModelConfigError(f"base model {model_id}: config must be a JSON object")

        def get(key: str) -> int:
            return _positive_int(config, key, model_id)

        hidden, heads = get("hidden_size"), get("num_attention_heads")
        kv_heads = heads
        if config.get("num_key_value_heads") is not None:
            kv_heads = get("num_key_value_heads")
        if config.get("head_dim") is not None:
            head_dim = get("head_dim")
        elif hidden % heads == 0:
            head_dim = hidden // heads
        else:
            raise BaseModelConfigError(f"base model {model_id}: hidden_size {hidden} is not a "
                                       f"multiple of num_attention_heads {heads}; set head_dim")
        if heads % kv_heads:
            raise BaseModelConfigError(f"base model {model_id}: num_attention_heads {heads} is "
                                       f"not a multiple of num_key_value_heads {kv_heads}")
        return cls(model_id, hidden, get("intermediate_size"), get("num_hidden_layers"), heads,
                   kv_heads, head_dim)

    def projection_shape(self, module: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of one projection (raises KeyError if unknown)."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }[module]
