"""Generation whose LoRA deltas come from a callable instead of adapter slots.

For adapters whose weights the engine never holds (e.g. weights under homomorphic encryption,
whose deltas someone else computes or decrypts), a :class:`DeltaHook` is asked, for each
target (layer, module), for ``delta = f(x)`` given that module's input rows ``x``; the delta is
added to the module's output. This runs on a path of its own: :class:`DeltaGenerator` decodes one
sequence greedily on the caller's thread with a one-sequence KV cache, never inside an engine's
shared batch, so a slow hook stalls nobody else. The hook is a plain callable; the engine knows
nothing of what is behind it.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import torch

from .kv_cache import KVCache
from .lora import GROUPS
from .model.checkpoint import resolve_checkpoint
from .model.llama import LlamaModel
from .model.rope import Rope
from .model.weights import LlamaDims, LlamaWeights, load_weights
from .tokenizer import Tokenizer

#: ``hook(layer, module, x)``: x is the module's input ``[tokens, in]``; returns its LoRA delta
#: ``[tokens, out]`` (any float dtype, any device; it is cast to the model's).
DeltaHook = Callable[[int, str, torch.Tensor], torch.Tensor]


class DeltaLora:
    """Stands where a LoraBatch does in the forward pass: for every targeted (layer, module) of a
    projection group, adds ``hook(layer, module, x)`` to that module's columns of the output."""

    def __init__(self, dims: LlamaDims, hook: DeltaHook, targets: Mapping[str, Collection[int]]) -> None:
        unknown = set(targets) - {m for ms in GROUPS.values() for m in ms}
        if unknown:
            raise ValueError(f"unknown target modules {sorted(unknown)}")
        self.hook = hook
        self.targets = {m: frozenset(layers) for m, layers in targets.items()}
        # group -> [(module, first output column, out features)]
        self._columns: dict[str, list[tuple[str, int, int]]] = {}
        for group, modules in GROUPS.items():
            col = 0
            for m in modules:
                out = dims.projection_shape(m)[1]
                if m in self.targets:
                    self._columns.setdefault(group, []).append((m, col, out))
                col += out

    def apply(self, group: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        for module, col, width in self._columns.get(group, ()):
            if layer not in self.targets[module]:
                continue
            delta = self.hook(layer, module, x)
            if tuple(delta.shape) != (x.shape[0], width):
                raise ValueError(f"delta hook gave {tuple(delta.shape)} for layer {layer} {module}, "
                                 f"expected {(x.shape[0], width)}")
            out[:, col : col + width] += delta.to(device=out.device, dtype=out.dtype)


class DeltaGenerator:
    """Greedy decoding of one sequence at a time with an optional :class:`DeltaHook`."""

    def __init__(self, weights: LlamaWeights, rope: Rope, tokenizer: Tokenizer, max_len: int) -> None:
        if max_len > rope.cos.shape[0]:
            raise ValueError(f"max_len {max_len} exceeds the rotary tables' {rope.cos.shape[0]} positions")
        self.dims = weights.dims
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self._cache = KVCache(self.dims, 1, max_len, self.dtype, self.device)
        self._cache.prepare(0)
        self.model = LlamaModel(weights, rope, self._cache)

    @classmethod
    def load(cls, model: str | Path, cache_dir: Path, *, dtype: torch.dtype = torch.float32,
             device: str = "cpu", max_len: int = 1024) -> "DeltaGenerator":
        """Its own copy of the model (a checkpoint directory or a model name)."""
        checkpoint = resolve_checkpoint(str(model), cache_dir)
        dev = torch.device(device)
        weights = load_weights(checkpoint, dtype, dev)
        max_len = min(max_len, weights.dims.max_position_embeddings)
        return cls(weights, Rope(checkpoint, max_len, dtype, dev), Tokenizer(checkpoint), max_len)

    @torch.inference_mode()
    def greedy(self, prompt_ids: Sequence[int], max_tokens: int, hook: DeltaHook | None = None,
               targets: Mapping[str, Collection[int]] | None = None, *, stop_at_eos: bool = True) -> list[int]:
        """The greedy continuation of ``prompt_ids`` (at most ``max_tokens``, ending at an
        end-of-sequence token unless ``stop_at_eos`` is off), the hook's deltas added to the
        targeted modules (``{module: layers}``); without a hook, the base model."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + max_tokens > self.max_len:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + {max_tokens} exceed {self.max_len}")
        lora = None if hook is None else DeltaLora(self.dims, hook, targets or {})
        dev = self.device
        n = len(prompt_ids)
        h = self.model.prefill(
            torch.tensor([list(prompt_ids)], device=dev), torch.zeros(1, dtype=torch.long, device=dev),
            torch.zeros(1, dtype=torch.long, device=dev), torch.tensor([n], device=dev), lora, fresh=True,
        )
        out: list[int] = []
        while True:
            token = int(self.model.logits(h).argmax(-1)[0])
            out.append(token)
            if len(out) >= max_tokens or (stop_at_eos and token in self.tokenizer.eos_ids):
                return out
            pos = n + len(out) - 1
            h = self.model.decode(torch.tensor([token], device=dev), torch.tensor([pos], device=dev), pos + 1, lora)
