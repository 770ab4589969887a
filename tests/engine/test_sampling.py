"""Sampling parameters, stop strings and incremental detokenization."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import ChatMessage, Engine, EngineConfig, FinishReason, GenerationRequest, InvalidRequest, SamplingParams
from engine.sampling import penalize, sample
from engine.stops import StopMatcher
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine(checkpoint: Path):
    e = Engine(EngineConfig(model=str(checkpoint), max_num_seqs=4, max_model_len=256, max_loras=1, max_lora_rank=4))
    e.start()
    yield e
    e.shutdown()


async def complete(engine: Engine, rid: str, prompt: str, **sampling) -> tuple[str, list]:
    chunks = [c async for c in engine.generate(GenerationRequest(request_id=rid, prompt=prompt,
                                                                  sampling=SamplingParams(**sampling)))]
    return "".join(c.text for c in chunks), chunks


PROMPT = "The three most important inventions in history are"


async def test_same_seed_same_output_and_seeds_differ(engine: Engine) -> None:
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    a, _ = await complete(engine, "s1", PROMPT, seed=7, **kw)
    b, _ = await complete(engine, "s2", PROMPT, seed=7, **kw)
    outs = {(await complete(engine, f"s{i}", PROMPT, seed=i, **kw))[0] for i in range(10, 14)}
    assert a == b
    assert len(outs) > 1


async def test_top_k_one_is_greedy(engine: Engine) -> None:
    greedy, _ = await complete(engine, "g", PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
    k1, _ = await complete(engine, "k1", PROMPT, max_tokens=12, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    assert greedy == k1


async def test_stop_string_truncates_and_reports_stop(engine: Engine) -> None:
    full, _ = await complete(engine, "full", PROMPT, max_tokens=32, temperature=0.0, ignore_eos=True)
    words = full.split()
    assert len(words) > 4
    stop = " " + words[3]
    text, chunks = await complete(engine, "stopped", PROMPT, max_tokens=32, temperature=0.0, stop=(stop,), ignore_eos=True)
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason is FinishReason.STOP


async def test_max_tokens_reports_length(engine: Engine) -> None:
    _, chunks = await complete(engine, "len", PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True)
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].completion_tokens == 5


def test_stop_matcher_holds_back_partial_stop() -> None:
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D tail") == ("", True)
    m2 = StopMatcher(["END"])
    assert m2.feed("abc E") == ("abc ", False)
    assert m2.feed("xyz") == ("Exyz", False)
    assert m2.feed("EN") == ("", False)
    assert m2.flush() == "EN"


def test_incremental_detokenization_is_utf8_safe(checkpoint: Path) -> None:
    tok = Tokenizer(checkpoint)
    text = "naïve café — 日本語のテキスト 🤖🎉 Ωμέγα"
    ids = tok.backend.encode(text, add_special_tokens=False).ids
    stream = tok.decode_stream([])
    pieces = [stream.step(tok.backend, i) for i in ids]
    joined = "".join(p for p in pieces if p)
    assert "\ufffd" not in joined
    assert joined == tok.decode(ids) == text
    assert any(p is None for p in pieces)  # some tokens end mid-character and were held back


# ---- vLLM's sampling extensions -------------------------------------------------------------------
async def test_ignore_eos_runs_to_max_tokens_and_eos_stops_otherwise(engine: Engine) -> None:
    chat = [ChatMessage("user", "Say hi")]

    async def run(**sampling) -> list:
        req = GenerationRequest(request_id=f"e{sorted(sampling.items())}", messages=chat,
                                sampling=SamplingParams(max_tokens=64, temperature=0.0, **sampling))
        return [c async for c in engine.generate(req)]

    natural = await run()
    assert natural[-1].finish_reason is FinishReason.STOP and natural[-1].completion_tokens < 64
    forced = await run(ignore_eos=True)
    assert forced[-1].finish_reason is FinishReason.LENGTH and forced[-1].completion_tokens == 64


async def test_min_tokens_holds_off_eos_stop_tokens_and_stop_strings(engine: Engine) -> None:
    chat = [ChatMessage("user", "What is 2+2? Answer with a number only.")]  # 8 tokens, greedy

    async def run(rid: str, **sampling) -> list:
        req = GenerationRequest(request_id=rid, messages=chat,
                                sampling=SamplingParams(max_tokens=64, temperature=0.0, **sampling))
        return [c async for c in engine.generate(req)]

    natural = await run("n")
    n = natural[-1].completion_tokens
    assert n < 20
    held = await run("m", min_tokens=20)
    assert held[-1].completion_tokens >= 20
    ids = [t for c in held for t in c.token_ids]
    assert not set(ids[:20]) & engine.tokenizer.eos_ids
    # the first n-1 tokens are the natural answer's: only the end was forbidden
    assert ids[: n - 1] == [t for c in natural for t in c.token_ids][: n - 1]
    # a stop string inside the first min_tokens tokens does not end it
    first_word = "".join(c.text for c in natural).split()[0]
    stopped = await run("s", min_tokens=20, stop=(first_word,))
    assert stopped[-1].completion_tokens >= 20


async def test_stop_token_ids_end_the_completion_without_their_text(engine: Engine) -> None:
    def request(rid: str, **sampling) -> GenerationRequest:
        return GenerationRequest(request_id=rid, prompt=PROMPT, sampling=SamplingParams(
            max_tokens=16, temperature=0.0, ignore_eos=True, **sampling))

    full = [c async for c in engine.generate(request("full"))]
    ids = [t for c in full for t in c.token_ids]
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])  # its first occurrence
    chunks = [c async for c in engine.generate(request("stop", stop_token_ids=(ids[k],)))]
    assert chunks[-1].finish_reason is FinishReason.STOP and chunks[-1].completion_tokens == k + 1
    text = "".join(c.text for c in chunks)
    assert text == engine.tokenizer.decode(ids[:k])
    # not before min_tokens
    later = [c async for c in engine.generate(request("later", stop_token_ids=(ids[k],), min_tokens=k + 2))]
    assert later[-1].completion_tokens > k + 1


def test_top_k_draws_only_among_the_k_best() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 2.8]])
    params = SamplingParams(temperature=5.0, top_k=3)
    seen = {sample(logits, [params], [torch.Generator().manual_seed(s)])[0] for s in range(300)}
    assert seen == {1, 3, 5}


def test_repetition_penalty_follows_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=gen) * 3
    seen_ids = torch.tensor([[3, 7, 7, 12, 49]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    row = logits[0].clone()
    mask = torch.zeros(50, dtype=torch.bool)
    mask[seen_ids[0]] = True
    penalize(row, mask, 1.3)
    assert torch.allclose(row, expected[0])


def test_engine_refuses_bad_extension_values(engine: Engine) -> None:
    for sampling, param in ((SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
                            (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
                            (SamplingParams(stop_token_ids=(10**6,)), "stop_token_ids"),
                            (SamplingParams(top_k=-1), "top_k")):
        with pytest.raises(InvalidRequest) as exc:
            engine._submit(GenerationRequest(request_id="bad", prompt="x", sampling=sampling), None)  # type: ignore
        assert exc.value.param == param
