"""Sampling parameters, stop strings and incremental detokenization."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine import Engine, EngineConfig, FinishReason, GenerationRequest, SamplingParams
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
