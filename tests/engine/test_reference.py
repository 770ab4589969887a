"""The engine against transformers + PEFT, in float32, on the real model."""
from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch

from engine import ChatMessage, Engine, GenerationRequest, SamplingParams
from engine.kv_cache import KVCache
from engine.lora import LoraSlots
from engine.model.llama import LlamaModel
from engine.model.rope import Rope
from engine.model.weights import load_weights
from engine.peft_dir import load_peft_dir

from .conftest import PEFT_SPECS

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 17 times 23?"]
N_TOKENS = 16


def greedy(max_tokens: int = N_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def run(engine: Engine, request: GenerationRequest) -> list[int]:
    ids: list[int] = []
    async for chunk in engine.generate(request):
        ids.extend(chunk.token_ids)
    return ids


@pytest.fixture(scope="module")
def loaded(fp32_engine: Engine, peft_dirs: dict[str, Path]) -> Engine:
    for name, path in peft_dirs.items():
        if name not in fp32_engine.adapters():
            config, tensors = load_peft_dir(path)
            fp32_engine.load_adapter(name, tensors, config)
    return fp32_engine


@pytest.fixture(scope="module")
def reference(checkpoint: Path, peft_dirs: dict[str, Path]):
    """transformers + PEFT greedy continuations, per adapter name (None = base) and prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    names = list(peft_dirs)
    model = PeftModel.from_pretrained(base, str(peft_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(peft_dirs[name]), adapter_name=name)
    model.eval()
    out: dict[tuple[str | None, str], tuple[list[int], list[int], torch.Tensor]] = {}
    for adapter in [None, *names]:
        for prompt in PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            if adapter is None:
                with model.disable_adapter():
                    gen, logits = _greedy(model, ids)
            else:
                model.set_adapter(adapter)
                gen, logits = _greedy(model, ids)
            out[(adapter, prompt)] = (ids[0].tolist(), gen, logits)
    return out


@torch.inference_mode()
def _greedy(model, ids: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Plain greedy loop, end-of-sequence ignored (as the engine's ignore_eos); returns the new
    tokens and the logits that chose the last one."""
    seq = ids
    for _ in range(N_TOKENS):
        logits = model(seq).logits[0, -1]
        seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    return seq[0, ids.shape[1]:].tolist(), logits


ADAPTERS = [None, *(s.name for s in PEFT_SPECS)]


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_greedy_tokens_equal_peft_reference(loaded: Engine, reference, adapter: str | None) -> None:
    for prompt in PROMPTS:
        req = GenerationRequest(request_id=f"ref-{adapter}-{prompt}", messages=[ChatMessage("user", prompt)],
                                sampling=greedy(), adapter_id=adapter)
        assert await run(loaded, req) == reference[(adapter, prompt)][1]


@pytest.mark.slow
async def test_row_in_mixed_batch_equals_row_alone(loaded: Engine, reference) -> None:
    reqs = [
        GenerationRequest(request_id=f"mix-{i}", messages=[ChatMessage("user", PROMPTS[i % len(PROMPTS)])],
                          sampling=greedy(), adapter_id=ADAPTERS[i % len(ADAPTERS)])
        for i in range(8)
    ]
    kernel = loaded.lora.native
    assert kernel is not None and "slot_lora" in await asyncio.to_thread(loaded.wait_for_kernels, 600)
    try:
        for attempt in ("gathered", "kernel"):
            # mixed decode steps gather their adapters' weights without the slot kernel, and read
            # the slots through it with
            loaded.lora.native = None if attempt == "gathered" else kernel
            together = await asyncio.gather(*(run(loaded, dataclasses.replace(r, request_id=f"{r.request_id}-{attempt}"))
                                              for r in reqs))
            for req, tokens in zip(reqs, together):
                prompt = req.messages[0].content
                assert tokens == reference[(req.adapter_id, prompt)][1], (attempt, req.request_id)
    finally:
        loaded.lora.native = kernel


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_last_position_logits_match_peft(checkpoint: Path, peft_dirs, reference, adapter: str | None) -> None:
    """Same forward pass the engine runs (prefill over the cache, multi-LoRA batch), in float32."""
    dev, dt = torch.device("cpu"), torch.float32
    weights = load_weights(checkpoint, dt, dev)
    cache = KVCache(weights.dims, 2, 256, dt, dev)
    model = LlamaModel(weights, Rope(checkpoint, 256, dt, dev), cache)
    slots = LoraSlots(weights.dims, 4, 16, dt, dev)
    slot = -1
    if adapter is not None:
        config, tensors = load_peft_dir(peft_dirs[adapter])
        slot = slots.load(adapter, tensors, config)
    prompt_ids, generated, ref_logits = reference[(adapter, PROMPTS[0])]
    ids = prompt_ids + generated[:-1]
    n = len(ids)
    hidden = model.prefill(torch.tensor([ids]), torch.tensor([0]), torch.tensor([0]), torch.tensor([n]),
                           slots.batch([slot] * n), fresh=True)
    logits = model.logits(hidden)[0]
    rel = (logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert rel < 1e-3, f"relative logit error {rel:.2e}"


@pytest.mark.slow
async def test_prefix_reuse_gives_identical_tokens_and_respects_salt_and_adapter(loaded: Engine, reference) -> None:
    prefixes = loaded.prefixes
    assert prefixes is not None
    prompt = "Explain photosynthesis to a child in a few sentences, please."

    async def once(rid: str, adapter: str | None, salt: str) -> list[int]:
        req = GenerationRequest(request_id=rid, messages=[ChatMessage("user", prompt)], sampling=greedy(),
                                adapter_id=adapter, cache_salt=salt)
        return await run(loaded, req)

    cold = await once("p1", "r8_attn", "tenant-a")
    after_cold = prefixes.hits
    warm = await once("p2", "r8_attn", "tenant-a")
    assert warm == cold
    assert prefixes.hits > after_cold  # the second request reused the first one's prompt blocks
    other_salt = prefixes.hits
    assert await once("p3", "r8_attn", "tenant-b") == cold
    other_adapter = await once("p4", "r4_qv", "tenant-a")
    assert prefixes.hits == other_salt  # neither another tenant nor another adapter hit those blocks
    assert other_adapter != cold


@pytest.mark.slow
async def test_repetition_penalty_tokens_equal_transformers(fp32_engine: Engine, checkpoint: Path) -> None:
    """The penalty over the prompt and the output so far, as transformers applies it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    penalty = RepetitionPenaltyLogitsProcessor(1.5)
    prompt = "List the days of the week, then list them again."
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    seq = ids
    with torch.inference_mode():
        for _ in range(24):
            logits = penalty(seq, model(seq).logits[:, -1])
            seq = torch.cat([seq, logits.argmax(-1).view(1, 1)], dim=1)
    expected = seq[0, ids.shape[1]:].tolist()
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, repetition_penalty=1.5)
    got = await run(fp32_engine, GenerationRequest(request_id="rep", messages=[ChatMessage("user", prompt)],
                                                   sampling=sampling))
    plain = await run(fp32_engine, GenerationRequest(request_id="rep0", messages=[ChatMessage("user", prompt)],
                                                     sampling=greedy(24)))
    assert got == expected
    assert got != plain  # the penalty changed the output
