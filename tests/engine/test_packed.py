"""Layer weights packed once for oneDNN (engine.model.packed): a bf16 engine on a CPU with fast
bf16 packs them, and every hidden state and token it computes is the plain weights', bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import ChatMessage, Engine, EngineConfig, GenerationRequest, SamplingParams
from engine.engine import _cpu_has_fast_bf16
from engine.model.packed import PROJECTIONS, can_pack, pack_layers, packed_linear
from engine.peft_dir import load_peft_dir

CONFIG = {"dtype": "bfloat16", "device": "cpu", "max_num_seqs": 40, "max_model_len": 512, "max_loras": 1,
          "max_lora_rank": 16, "prefix_cache_tokens": 0, "compiled_kernels": False}


@pytest.fixture(scope="module")
def pair(checkpoint):
    """The default (packed where it can be) and a plain-weights engine, both started."""
    made = [Engine(EngineConfig(model=str(checkpoint), **CONFIG)),
            Engine(EngineConfig(model=str(checkpoint), packed_weights=False, **CONFIG))]
    for engine in made:
        engine.start()
    yield made
    for engine in made:
        engine.shutdown()


def test_a_fast_bf16_cpu_packs_every_projection_and_plain_stays_plain(pair):
    packed, plain = pair
    assert plain.model.linear is F.linear
    assert all(getattr(layer, name).layout == torch.strided for layer in plain.model.w.layers for name in PROJECTIONS)
    if _cpu_has_fast_bf16():
        assert can_pack(torch.bfloat16, torch.device("cpu"))
        assert packed.model.linear is packed_linear
        assert all(getattr(layer, name).layout == torch._mkldnn
                   for layer in packed.model.w.layers for name in PROJECTIONS)
    # the tied embedding, also the logits head, stays as it is
    assert packed.model.w.embed.layout == torch.strided and packed.model.w.lm_head is packed.model.w.embed
    # float32 never packs
    assert not can_pack(torch.float32, torch.device("cpu"))


def test_decode_and_prefill_hidden_states_are_the_plain_weights_bit_for_bit(pair):
    packed, plain = pair
    gen = torch.Generator().manual_seed(3)
    for layer in range(len(plain.cache.k)):  # the same cached keys and values to attend over
        for cache in (plain.cache.k, plain.cache.v):
            cache[layer].copy_(torch.randn(cache[layer].shape, generator=gen))
        packed.cache.k[layer].copy_(plain.cache.k[layer])
        packed.cache.v[layer].copy_(plain.cache.v[layer])
    for n, ctx in ((1, 7), (5, 60), (40, 200)):  # rows below, at and above the packing's batch hint
        tokens = torch.randint(0, 4000, (n,), generator=gen)
        positions = torch.randint(0, ctx, (n,), generator=gen).clamp(max=ctx - 1)
        a = packed.model.decode(tokens, positions, ctx, None)
        b = plain.model.decode(tokens, positions, ctx, None)
        assert torch.equal(a, b), (n, ctx)
    for b_rows, t in ((1, 3), (2, 300)):
        tokens = torch.randint(0, 4000, (b_rows, t), generator=gen)
        args = (tokens, torch.arange(b_rows), torch.zeros(b_rows, dtype=torch.long), torch.full((b_rows,), t), None, True)
        assert torch.equal(packed.model.prefill(*args), plain.model.prefill(*args)), (b_rows, t)


async def test_greedy_tokens_with_and_without_an_adapter_are_the_plain_weights(pair, peft_dirs):
    config, tensors = load_peft_dir(peft_dirs["r16_all"])  # all seven projections
    for engine in pair:
        engine.load_adapter("r16", tensors, config)
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["What is the capital of France?", "Write a haiku about rain.", "2 + 2 =", "Name three colours."]

    async def run(engine: Engine) -> list[list[int]]:
        async def one(i: int) -> list[int]:
            req = GenerationRequest(request_id=f"p{i}", messages=[ChatMessage("user", prompts[i % len(prompts)])],
                                    sampling=sampling, adapter_id="r16" if i % 2 else None)
            ids: list[int] = []
            async for chunk in engine.generate(req):
                ids.extend(chunk.token_ids)
            return ids

        # one at a time: a batch's composition depends on when requests join it, and bf16
        # results on the batch's rows (batched shapes are compared bit for bit above)
        return [await one(i) for i in range(8)]

    try:
        got, want = await run(pair[0]), await run(pair[1])
    finally:
        for engine in pair:
            engine.unload_adapter("r16")
    assert all(len(ids) == 12 for ids in want)
    assert got == want


def test_pack_layers_declines_a_build_that_cannot_pack():
    """A weight that oneDNN cannot reorder (float64) leaves every layer as it was."""
    from engine.model.weights import LayerWeights, LlamaWeights

    w = torch.randn(8, 4, dtype=torch.float64)
    layer = LayerWeights(input_norm=torch.ones(4), qkv=w, o=w, post_norm=torch.ones(4), gate_up=w, down=w)
    weights = LlamaWeights(dims=None, embed=w, layers=[layer], norm=torch.ones(4), lm_head=w)  # type: ignore[arg-type]
    assert pack_layers(weights) is False
    assert all(getattr(layer, name) is w for name in PROJECTIONS)
