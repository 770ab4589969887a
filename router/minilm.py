"""A lean, inference-only forward pass of a BERT encoder (all-MiniLM-L6-v2) on the CPU.

Why not ``transformers.AutoModel``: routing encodes one short prompt at a time, where the
framework's per-module overhead and reading 42 MB of fp32 weights dominate; this module (fp16-
packed linears, fused Q/K/V) is faster per prompt and loads from safetensors in a fraction of
the time (``python -m loadtests.bench_router`` measures it; README has the figures). ``tests/router`` checks the sentence embedding
against ``transformers``' ``BertModel``: equal within 1e-5 with fp32 weights, within 2e-3
with fp16-packed ones (cosine similarity to the fp32 embedding > 0.9999).

fp16 packing uses fbgemm's ``quantized::linear_dynamic_fp16``: weights stored in fp16 (half
the bytes to read), arithmetic in fp32. Where that op is missing (torch builds without fbgemm)
plain fp32 ``F.linear`` is used.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

Linear = Callable[[torch.Tensor], torch.Tensor]


def fp16_linear_available() -> bool:
    """Whether this torch build has fbgemm's fp16 linear (checked by running it once)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(2, 2), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 2), packed)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def make_linear(weight: torch.Tensor, bias: torch.Tensor, fp16: bool) -> Linear:
    """``x @ weight.T + bias`` for 2-D ``x``, with fp16-packed weights when ``fp16``."""
    if fp16:
        packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
        return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)
    return lambda x: F.linear(x, weight, bias)


class _Layer:
    def __init__(self, w: dict[str, torch.Tensor], fp16: bool) -> None:
        qkv_w = torch.cat([w[f"attention.self.{n}.weight"] for n in ("query", "key", "value")])
        qkv_b = torch.cat([w[f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
        self.qkv = make_linear(qkv_w, qkv_b, fp16)
        self.out = make_linear(w["attention.output.dense.weight"], w["attention.output.dense.bias"], fp16)
        self.norm1 = (w["attention.output.LayerNorm.weight"], w["attention.output.LayerNorm.bias"])
        self.up = make_linear(w["intermediate.dense.weight"], w["intermediate.dense.bias"], fp16)
        self.down = make_linear(w["output.dense.weight"], w["output.dense.bias"], fp16)
        self.norm2 = (w["output.LayerNorm.weight"], w["output.LayerNorm.bias"])


class MiniLM:
    """BERT encoder weights from ``model_dir`` (``config.json`` + ``model.safetensors``)."""

    def __init__(self, model_dir: str | Path, *, fp16: bool = True) -> None:
        path = Path(model_dir)
        config = json.loads((path / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise ValueError(f"{path} is not a BERT encoder with GELU: "
                             f"{config.get('model_type')}/{config.get('hidden_act')}")
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.depth = config["num_hidden_layers"]
        self.max_positions = config["max_position_embeddings"]
        self.eps = config["layer_norm_eps"]
        weights = {k.removeprefix("bert."): v for k, v in load_file(path / "model.safetensors").items()}
        self.fp16 = fp16 and fp16_linear_available()
        self.word = weights["embeddings.word_embeddings.weight"]
        self.position = weights["embeddings.position_embeddings.weight"]
        self.token_type = weights["embeddings.token_type_embeddings.weight"][0]
        self.norm0 = (weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(self.depth):
            prefix = f"encoder.layer.{i}."
            own = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
            self.layers.append(_Layer(own, self.fp16))

    def _norm(self, x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), params[0], params[1], self.eps)

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor | None, upto: int) -> list[torch.Tensor]:
        """Hidden states ``[b, t, hidden]`` of the embedding layer (index 0) and of layers
        1..``upto``; ``mask`` (``[b, t]``, 1 = token) is ``None`` when nothing is padding."""
        b, t = ids.shape
        x = self.word[ids] + self.position[:t] + self.token_type
        x = self._norm(x, self.norm0).reshape(b * t, self.hidden)
        attend = None if mask is None else mask.bool()[:, None, None, :]
        states = [x]
        for layer in self.layers[:upto]:
            qkv = layer.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attend)
            x = self._norm(layer.out(ctx.transpose(1, 2).reshape(b * t, self.hidden)) + x, layer.norm1)
            x = self._norm(layer.down(F.gelu(layer.up(x))) + x, layer.norm2)
            states.append(x)
        return [s.view(b, t, self.hidden) for s in states]

    @torch.inference_mode()
    def mean_pool(self, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """Masked means ``[b, len(layers), hidden]`` of the given layers' hidden states."""
        padded = not bool(mask.all())
        states = self.hidden_states(ids, mask if padded else None, max(layers))
        weights = mask.unsqueeze(-1).to(states[0].dtype)
        count = weights.sum(1).clamp(min=1e-9)
        return torch.stack([(states[layer] * weights).sum(1) / count for layer in layers], dim=1)
