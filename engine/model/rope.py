"""Rotary position tables for the checkpoint's config, laid out for a cheap apply: the original
RoPE is computed here, scaled variants (linear, llama3, yarn, ...) by transformers' own code."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _scaled_tables(checkpoint: Path, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin from transformers' RoPE code (linear, dynamic, llama3, yarn, ... scaling)."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(AutoConfig.from_pretrained(checkpoint))
    return rotary(torch.empty(0, dtype=torch.float32), torch.arange(max_len)[None, :])


class Rope:
    """cos/sin tables for positions [0, max_len) in the half-split layout Llama uses.

    ``sin_signed`` folds rotate_half's sign into the table, so applying RoPE is
    ``x * cos + roll(x, d/2) * sin_signed``: three kernels instead of six.
    """

    def __init__(self, checkpoint: Path, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        cfg = json.loads((checkpoint / "config.json").read_text())
        params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            # The original RoPE needs no library: skip importing transformers (~1 s at start).
            theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
            dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos()[None], emb.sin()[None]
        else:
            cos, sin = _scaled_tables(checkpoint, max_len)
        half = cos.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        self.half = half
        self.cos = cos[0].to(device=device, dtype=dtype).contiguous()
        self.sin_signed = sin[0].to(device=device, dtype=dtype).contiguous()

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for ``positions`` [N] shaped [N, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [N, heads, head_dim]."""
        return torch.addcmul(x * cos, torch.roll(x, self.half, dims=-1), sin)
