"""Rotary position tables, computed by transformers' own RoPE code for the checkpoint's config
(default, linear, llama3, yarn, ... scaling), then laid out for a cheap apply."""
from __future__ import annotations

from pathlib import Path

import torch


class Rope:
    """cos/sin tables for positions [0, max_len) in the half-split layout Llama uses.

    ``sin_signed`` folds rotate_half's sign into the table, so applying RoPE is
    ``x * cos + roll(x, d/2) * sin_signed``: three kernels instead of six.
    """

    def __init__(self, checkpoint: Path, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import AutoConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        config = AutoConfig.from_pretrained(checkpoint)
        rotary = LlamaRotaryEmbedding(config)
        positions = torch.arange(max_len)[None, :]
        probe = torch.empty(0, dtype=torch.float32)
        cos, sin = rotary(probe, positions)  # [1, max_len, head_dim], float32
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
