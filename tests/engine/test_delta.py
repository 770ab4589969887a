"""engine.delta: a delta hook on a generation path of its own gives the tokens of the engine's
own LoRA path for the same adapter, the base model's without a hook, and refuses a delta of the
wrong shape."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine import AdapterConfig, DeltaGenerator, Engine, GenerationRequest, SamplingParams
from engine.delta import DeltaLora

LAYERS = (0, 2)
TOKENS = 6


def factors(seed: int = 7) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {(layer, m): (torch.randn(8, 576, generator=g) * 0.1, torch.randn(out, 8, generator=g) * 0.1)
            for layer in LAYERS for m, out in (("q_proj", 576), ("v_proj", 192))}


async def engine_tokens(engine: Engine, ids: list[int], adapter: str | None) -> list[int]:
    out: list[int] = []
    request = GenerationRequest(f"delta-{adapter}", SamplingParams(max_tokens=TOKENS, temperature=0.0,
                                                                    ignore_eos=True),
                                prompt_token_ids=ids, adapter_id=adapter)
    async for chunk in engine.generate(request):
        out.extend(chunk.token_ids)
    return out


def test_hook_gives_the_engines_lora_tokens_and_no_hook_the_base_models(fp32_engine: Engine) -> None:
    f = factors()
    config = AdapterConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))
    tensors = {}
    for (layer, m), (a, b) in f.items():
        prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    calls: list[tuple[int, str, int]] = []

    def hook(layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        calls.append((layer, module, x.shape[0]))
        a, b = f[(layer, module)]
        return config.scaling * (x @ a.T) @ b.T

    gen = DeltaGenerator(fp32_engine.model.w, fp32_engine.model.rope, fp32_engine.tokenizer, 256)
    ids = fp32_engine.tokenize(prompt="The three primary colours are")
    targets = {"q_proj": LAYERS, "v_proj": LAYERS}
    hooked = gen.greedy(ids, TOKENS, hook, targets, stop_at_eos=False)
    base = gen.greedy(ids, TOKENS, stop_at_eos=False)
    fp32_engine.load_adapter("delta-ref", tensors, config)
    try:
        want = asyncio.run(engine_tokens(fp32_engine, ids, "delta-ref"))
    finally:
        fp32_engine.unload_adapter("delta-ref")
    assert hooked == want
    assert base == asyncio.run(engine_tokens(fp32_engine, ids, None))
    assert hooked != base
    # prefill once with every prompt row, then one row per decoded token, per targeted module
    assert calls[:4] == [(0, "q_proj", len(ids)), (0, "v_proj", len(ids)), (2, "q_proj", len(ids)),
                         (2, "v_proj", len(ids))]
    assert len(calls) == 4 * TOKENS and {n for _, _, n in calls[4:]} == {1}


def test_wrong_delta_shape_and_unknown_module_are_refused(fp32_engine: Engine) -> None:
    gen = DeltaGenerator(fp32_engine.model.w, fp32_engine.model.rope, fp32_engine.tokenizer, 64)
    ids = fp32_engine.tokenize(prompt="Hello")
    with pytest.raises(ValueError, match="expected"):
        gen.greedy(ids, 2, lambda layer, m, x: torch.zeros(x.shape[0], 7), {"v_proj": [0]})
    with pytest.raises(ValueError, match="unknown target modules"):
        DeltaLora(gen.dims, lambda layer, m, x: x, {"qkv_proj": [0]})
    with pytest.raises(ValueError, match="exceed"):
        gen.greedy(ids, 64)
