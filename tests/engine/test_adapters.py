"""The engine's adapter API: slots, limits, refusals."""
from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest
import torch

from engine import (
    AdapterConfig,
    AdapterExists,
    AdapterInUse,
    AdapterNotFound,
    AdapterRankTooLarge,
    AdapterSlotsFull,
    Engine,
    GenerationRequest,
    InvalidAdapter,
    SamplingParams,
)
from engine.lora import FORMS

HIDDEN, KV = 576, 192


def lora(rank: int, modules=("q_proj",), layers=range(30), seed: int = 0) -> tuple[dict, AdapterConfig]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, KV)}
    tensors = {}
    for layer in layers:
        for m in modules:
            fan_in, fan_out = shapes[m]
            p = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.1
            tensors[f"{p}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.1
    return tensors, AdapterConfig(rank=rank, alpha=2 * rank, target_modules=tuple(modules))


@pytest.fixture()
def engine(small_engine: Engine) -> Engine:
    return small_engine


def test_slots_fill_then_refuse_and_unload_frees(engine: Engine) -> None:
    engine.load_adapter("a", *lora(4, seed=1))
    engine.load_adapter("b", *lora(8, seed=2))
    assert sorted(engine.adapters()) == ["a", "b"]
    assert engine.capacity().free_adapter_slots == 0
    with pytest.raises(AdapterSlotsFull) as info:
        engine.load_adapter("c", *lora(4))
    assert info.value.slots == 2
    with pytest.raises(AdapterExists):
        engine.load_adapter("a", *lora(4))
    engine.unload_adapter("a")
    engine.load_adapter("c", *lora(4))
    assert sorted(engine.adapters()) == ["b", "c"]
    with pytest.raises(AdapterNotFound):
        engine.unload_adapter("a")


def test_rank_above_maximum_is_refused_with_both_numbers(engine: Engine) -> None:
    with pytest.raises(AdapterRankTooLarge, match="rank 16 exceeds max_lora_rank 8"):
        engine.load_adapter("big", *lora(16))
    assert engine.adapters() == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update({next(iter(t)): torch.zeros(3, 3)}), "shape"),
        (lambda t: t.update({"model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, HIDDEN)}), "target_modules"),
        (lambda t: t.update({"something.else": torch.zeros(1)}), "unexpected tensor"),
        (lambda t: t.pop(next(k for k in t if "lora_B" in k)), "lacks lora_A or lora_B"),
        (lambda t: t.update({"model.layers.99.self_attn.q_proj.lora_A.weight": torch.zeros(4, HIDDEN)}), "layer 99"),
    ],
)
def test_malformed_adapter_is_refused(engine: Engine, mutate, message: str) -> None:
    tensors, config = lora(4)
    mutate(tensors)
    with pytest.raises(InvalidAdapter, match=message):
        engine.load_adapter("bad", tensors, config)
    assert engine.adapters() == [] and engine.capacity().free_adapter_slots == 2


async def test_unload_refused_while_in_use_and_unknown_adapter_request_fails(engine: Engine) -> None:
    engine.load_adapter("busy", *lora(4, seed=3))
    req = GenerationRequest(request_id="r", prompt="Tell me a story", adapter_id="busy",
                            sampling=SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    gen = engine.generate(req)
    await gen.__anext__()
    with pytest.raises(AdapterInUse) as info:
        engine.unload_adapter("busy")
    assert info.value.users == 1
    await gen.aclose()
    for _ in range(200):
        try:
            engine.unload_adapter("busy")
            break
        except AdapterInUse:
            await asyncio.sleep(0.01)
    assert engine.adapters() == []
    with pytest.raises(AdapterNotFound):
        await engine.generate(GenerationRequest(request_id="x", prompt="hi", adapter_id="busy",
                                                  sampling=SamplingParams(max_tokens=5))).__anext__()


async def test_adapter_changes_output_and_slot_reuse_takes_new_weights(engine: Engine) -> None:
    async def text(adapter: str | None, rid: str) -> str:
        req = GenerationRequest(request_id=rid, prompt="The weather today is", adapter_id=adapter,
                                sampling=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        return "".join([c.text async for c in engine.generate(req)])

    base = await text(None, "base")
    engine.load_adapter("x", *lora(8, modules=("q_proj", "v_proj"), seed=11))
    with_x = await text("x", "x1")
    engine.unload_adapter("x")
    engine.load_adapter("x", *lora(8, modules=("q_proj", "v_proj"), seed=12))
    with_new_x = await text("x", "x2")
    assert with_x != base
    assert with_new_x != with_x


def _slot_contents(engine: Engine, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    lora_slots = engine.lora
    slot = lora_slots.slot_of(adapter)
    return {m: (lora_slots.A[m][:, slot].clone(), lora_slots.B[m][:, slot].clone()) for m in lora_slots.A}


@pytest.mark.parametrize("layers", [range(30), range(0, 30, 3)], ids=["all-layers", "some-layers"])
def test_prepared_adapter_fills_the_slot_exactly_like_raw_tensors(engine: Engine, layers) -> None:
    # a rank-8 occupant on both modules first, so the rank-4 loads must also clear what it left
    engine.load_adapter("old", *lora(8, modules=("q_proj", "v_proj"), seed=20))
    engine.unload_adapter("old")
    tensors, config = lora(4, modules=("q_proj", "v_proj"), layers=layers, seed=21)
    engine.load_adapter("raw", tensors, config)
    raw = _slot_contents(engine, "raw")
    engine.unload_adapter("raw")

    engine.load_adapter("old", *lora(8, modules=("q_proj", "v_proj"), seed=20))
    engine.unload_adapter("old")
    prepared = engine.prepare_adapter("stacked", tensors, config)
    assert set(prepared) == set(tensors) and prepared.dtype == engine.lora.dtype
    assert prepared.nbytes == sum(t.numel() for t in tensors.values()) * prepared.dtype.itemsize
    engine.load_adapter("stacked", prepared, config)
    stacked = _slot_contents(engine, "stacked")
    for module, (a, b) in raw.items():
        assert torch.equal(stacked[module][0], a) and torch.equal(stacked[module][1], b), module
    q = raw["q_proj"]
    unused = [layer for layer in range(30) if layer not in layers]
    assert q[0][:, 4:].abs().sum() == 0 and q[1][:, 4:].abs().sum() == 0  # the old rank-8 rows are gone
    assert q[0][unused].abs().sum() == 0 and q[1][unused].abs().sum() == 0
    scaled = tensors[f"base_model.model.model.layers.{layers[0]}.self_attn.q_proj.lora_B.weight"] * config.scaling
    assert torch.allclose(q[1][layers[0], :4].t().float(), scaled, rtol=1e-2, atol=1e-3)  # B kept transposed
    # an adapter prepared once loads again (it is what the CPU cache keeps), and validation holds
    engine.unload_adapter("stacked")
    assert engine.prepare_adapter("again", prepared, config) is prepared
    with pytest.raises(InvalidAdapter):
        engine.prepare_adapter("bad", {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 3)}, config)


async def test_async_load_runs_between_steps_and_a_cancelled_load_gives_its_slot_back(engine: Engine) -> None:
    busy = engine.generate(GenerationRequest(request_id="busy", prompt="Tell me a story", adapter_id=None,
                                             sampling=SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)))
    await busy.__anext__()  # the step thread is generating
    tensors, config = lora(4, seed=30)
    await engine.load_adapter_async("a", tensors, config)
    assert engine.adapters() == ["a"]
    chunks = [c async for c in engine.generate(GenerationRequest(
        request_id="on-a", prompt="Hi", adapter_id="a", sampling=SamplingParams(max_tokens=3, ignore_eos=True)))]
    assert chunks[-1].completion_tokens == 3

    tensors, config = lora(4, seed=31)
    prepared = engine.prepare_adapter("b", tensors, config)
    load = asyncio.ensure_future(engine.load_adapter_async("b", prepared, config))
    await asyncio.sleep(0)  # prepared already: it reserved a slot and waits for the step thread
    assert engine.capacity().free_adapter_slots == 0
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    await busy.aclose()
    assert engine.adapters() == ["a"] and engine.capacity().free_adapter_slots == 1
    engine.load_adapter("c", *lora(4, seed=32))  # the slot is usable again
    assert sorted(engine.adapters()) == ["a", "c"]


@functools.lru_cache(maxsize=2)
def _twenty_adapters(dtype: torch.dtype):
    """Slots of a tiny model holding 20 adapters of ranks 2-4 on q, v and down (the reference
    tensors beside them), and the slot kernel of their kernel form, built for this machine."""
    import tempfile

    from engine.lora import LoraSlots
    from engine.lora.native import load
    from engine.model.weights import LlamaDims

    dims = LlamaDims(hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                     vocab_size=32, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=True)
    slots = LoraSlots(dims, 20, 4, dtype, torch.device("cpu"))
    assert slots.mixed_form in FORMS and slots.matmul_form in FORMS  # timed on this machine
    gen = torch.Generator().manual_seed(3)
    adapters = {}
    for slot, rank in enumerate(((2, 4, 3) * 7)[:20]):
        tensors = {}
        for layer in range(dims.num_layers):
            for module in ("q_proj", "v_proj", "down_proj"):
                fan_in, fan_out = dims.projection_shape(module)
                tensors[f"base_model.model.model.layers.{layer}.{'mlp' if module == 'down_proj' else 'self_attn'}."
                        f"{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen).to(dtype).float()
                tensors[f"base_model.model.model.layers.{layer}.{'mlp' if module == 'down_proj' else 'self_attn'}."
                        f"{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen).to(dtype).float()
        config = AdapterConfig(rank=rank, alpha=2.0 * rank, target_modules=("q_proj", "v_proj", "down_proj"))
        assert slots.load(f"a{slot}", tensors, config) == slot
        adapters[slot] = (tensors, config.scaling)
    return dims, slots, adapters, load(Path(tempfile.mkdtemp(prefix="tensafe-kernels-")))


@pytest.mark.parametrize("form", [*FORMS, "kernel"])  # how a thin mixed batch computes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("token_slots", [
    [0, 0, 1, 2, 2, 2],  # every row on an adapter, unequal groups: rows picked from the padded result
    [2, -1, 0, 0, -1, 1, 2],  # base rows among them: scattered back
    [1, 1, 1],  # one adapter
    [-1, 1, -1],  # one adapter and the base model
    list(range(17)),  # each row its own adapter, many of them: in row order, q/k/v expanded apart
    [16, 3, 9, 0, 12, 5, 1, 14, 7, 2, 11, 4, 15, 6, 13, 8, 10],  # the same, rows in another order
    [*range(16), 3, -1, 19],  # many adapters, one shared, a base row: expanded apart, scattered back
])
def test_a_batch_s_lora_delta_is_each_row_s_own_adapter_s(token_slots, dtype, form):
    from engine.lora import GROUPS

    dims, slots, adapters, kernel = _twenty_adapters(dtype)
    gen = torch.Generator().manual_seed(len(token_slots))
    distinct = {s for s in token_slots if s >= 0}
    if form == "kernel":
        assert kernel is not None, "the kernel form needs a C compiler"
        slots.native = kernel
    else:
        slots.native = None
        slots.mixed_form = form
    batch = slots.batch(token_slots)
    # the kernel serves any thin batch; without it, one adapter's rows are plain matmuls
    assert batch.form == ("kernel" if form == "kernel" else form if len(distinct) > 1 else slots.matmul_form)
    if len(distinct) >= 16 and form != "kernel":  # the paths these cases are for
        assert batch.groups["qkv"].b is None and len(batch.groups["qkv"].parts) == 2  # q and v
        assert batch.in_order == (len(distinct) == len(token_slots))
    if form == "kernel":
        assert not batch.groups  # nothing gathered: the kernel reads the slots
        assert [plans[1].modules for plans in batch.slot_groups.values()] == [2, 1]  # q and v; down
    for group, layer in (("qkv", 1), ("down", 0)):
        fan_in = dims.projection_shape(GROUPS[group][0])[0]
        outs = [dims.projection_shape(m)[1] for m in GROUPS[group]]
        x = torch.randn(len(token_slots), fan_in, generator=gen).to(dtype)
        out = torch.zeros(len(token_slots), sum(outs), dtype=dtype)
        batch.apply(group, layer, x, out)
        x = x.float()
        for row, slot in enumerate(token_slots):
            expected = torch.zeros(sum(outs))
            if slot >= 0:
                tensors, scale = adapters[slot]
                col = 0
                for module, width in zip(GROUPS[group], outs, strict=True):
                    prefix = f"base_model.model.model.layers.{layer}.{'mlp' if module == 'down_proj' else 'self_attn'}."
                    a = tensors.get(f"{prefix}{module}.lora_A.weight")
                    if a is not None:
                        b = tensors[f"{prefix}{module}.lora_B.weight"]
                        expected[col:col + width] = scale * (x[row] @ a.t() @ b.t())
                    col += width
            tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bf16: the output's rounding
            torch.testing.assert_close(out[row].float(), expected, rtol=tolerance, atol=tolerance)
