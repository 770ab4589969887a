"""Greedy generation with an HE adapter (q_proj of layers 0 and 1, each delta computed on
ciphertexts and decrypted by the key holder over HTTP) gives the plaintext adapter's tokens:
the engine's own LoRA path and a plain forward with the delta added agree with it."""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from engine import AdapterConfig, ChatMessage, GenerationRequest, SamplingParams
from gateway.cli.he import he_hook, plaintext_hook
from privacy.adapter import TOKENS_PER_ROUND_TRIP, EncryptedAdapter, HeLora, encrypt_adapter

from .conftest import lora

pytestmark = pytest.mark.slow

LAYERS = [0, 1]
TOKENS = 6


def engine_tokens(engine, ids: list[int], tensors, config) -> list[int]:
    engine.load_adapter("plain", tensors, AdapterConfig(config.rank, config.alpha, config.target_modules))

    async def run() -> list[int]:
        out: list[int] = []
        request = GenerationRequest("he-ref", SamplingParams(max_tokens=TOKENS, temperature=0.0),
                                    prompt_token_ids=ids, adapter_id="plain")
        async for chunk in engine.generate(request):
            out.extend(chunk.token_ids)
        return out

    try:
        return asyncio.run(run())
    finally:
        engine.unload_adapter("plain")


def test_he_adapter_gives_the_plaintext_adapters_greedy_tokens(fp32, generator, secret_ctx, server_ctx,
                                                             client) -> None:
    config, tensors = lora(8, ("q_proj",), LAYERS, seed=5, std=0.1)
    adapter = EncryptedAdapter.load(server_ctx, encrypt_adapter(secret_ctx, config, tensors,
                                                                {"q_proj": LAYERS}).serialize())
    ids = generator.tokenizer.tokenize(messages=[ChatMessage("user", "What is the capital of France?")])
    targets = {"q_proj": LAYERS}

    he = HeLora(adapter, client)
    encrypted, reference = he_hook(he), plaintext_hook(config, tensors)
    errors: list[float] = []

    def compared(layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        got, want = encrypted(layer, module, x), reference(layer, module, x.double())
        errors.append(float((got - want).abs().max() / want.abs().max()))
        return got

    he_out = generator.greedy(ids, TOKENS, compared, targets)
    plain_out = generator.greedy(ids, TOKENS, reference, targets)
    base_out = generator.greedy(ids, TOKENS)
    engine_out = engine_tokens(fp32, ids, tensors, config)

    assert he_out == plain_out == engine_out
    assert he_out != base_out  # the adapter matters for these tokens
    # prefill, then one delta per decoded token but the last, for each of the two layers
    assert len(errors) == len(LAYERS) * TOKENS
    batches = math.ceil(len(ids) / TOKENS_PER_ROUND_TRIP) + TOKENS - 1
    assert he.stats.round_trips == 2 * len(LAYERS) * batches
    assert max(errors) <= 1e-3, errors
    print(f"HE vs plaintext deltas: largest error {max(errors):.2e} of the largest |delta|; "
          f"tokens {he_out} equal; base {base_out}")
    assert np.isfinite(errors).all()
