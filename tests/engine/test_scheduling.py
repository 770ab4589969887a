"""Continuous batching, the bounded queue, aborts and disconnects on the real model."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import (
    ChatMessage,
    ContextLengthExceeded,
    Engine,
    EngineConfig,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
)


@pytest.fixture(scope="module")
def small_engine(checkpoint: Path):
    """Two sequence slots, room for one waiting request."""
    engine = Engine(EngineConfig(model=str(checkpoint), max_num_seqs=2, max_queue=1, max_model_len=256,
                                 max_loras=1, max_lora_rank=8))
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(autouse=True)
async def settle(small_engine: Engine):
    """Each test starts from an idle engine (aborts land on the step thread asynchronously)."""
    await wait_for(lambda: small_engine.capacity().free_sequence_slots == 2)
    yield


def long_request(rid: str) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt="Once upon a time",
                             sampling=SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def first_chunk(engine: Engine, req: GenerationRequest):
    gen = engine.generate(req)
    chunk = await gen.__anext__()
    return gen, chunk


async def drain(gen) -> list:
    return [c async for c in gen]


async def test_full_cache_queues_then_overloads_and_abort_admits_waiting(small_engine: Engine) -> None:
    e = small_engine
    g1, _ = await first_chunk(e, long_request("a"))
    g2, _ = await first_chunk(e, long_request("b"))
    assert e.capacity().free_sequence_slots == 0
    waiting = asyncio.create_task(drain(e.generate(GenerationRequest(
        request_id="c", prompt="Hello", sampling=SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)))))
    await wait_for(lambda: e.capacity().queue_depth == 1)
    with pytest.raises(EngineOverloaded):
        await e.generate(long_request("d")).__anext__()
    e.abort("a")
    rest = await drain(g1)
    assert rest[-1].finish_reason is FinishReason.ABORT
    chunks = await asyncio.wait_for(waiting, 30)
    assert chunks[-1].finish_reason is FinishReason.LENGTH and chunks[-1].completion_tokens == 3
    await g2.aclose()  # a client going away
    await wait_for(lambda: e.capacity().free_sequence_slots == 2 and e.capacity().queue_depth == 0)


async def test_disconnect_frees_slot_at_once(small_engine: Engine) -> None:
    e = small_engine
    gen, _ = await first_chunk(e, long_request("gone"))
    assert e.capacity().free_sequence_slots == 1
    await gen.aclose()
    await wait_for(lambda: e.capacity().free_sequence_slots == 2, timeout=5)


async def test_new_requests_join_a_running_batch(small_engine: Engine) -> None:
    e = small_engine
    g1, _ = await first_chunk(e, long_request("early"))
    late = await drain(e.generate(GenerationRequest(
        request_id="late", prompt="Hi", sampling=SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))))
    # the late request finished while the early one is still generating
    assert late[-1].finish_reason is FinishReason.LENGTH
    nxt = await g1.__anext__()
    assert nxt.finish_reason is None and nxt.completion_tokens < 200
    await g1.aclose()


async def test_context_length_and_invalid_sampling_fail_before_any_token(small_engine: Engine) -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        await small_engine.generate(GenerationRequest(
            request_id="too-long", prompt="hello " * 10, sampling=SamplingParams(max_tokens=250))).__anext__()
    assert info.value.max_model_len == 256
    with pytest.raises(InvalidRequest):
        await small_engine.generate(GenerationRequest(
            request_id="bad", prompt="hi", sampling=SamplingParams(top_p=0.0))).__anext__()
    with pytest.raises(InvalidRequest):
        await small_engine.generate(GenerationRequest(request_id="empty", prompt="")).__anext__()
    assert small_engine.capacity().free_sequence_slots == 2


async def test_duplicate_request_id_in_flight_is_refused(small_engine: Engine) -> None:
    gen, _ = await first_chunk(small_engine, long_request("dup"))
    with pytest.raises(InvalidRequest):
        await small_engine.generate(long_request("dup")).__anext__()
    await gen.aclose()


async def test_shutdown_aborts_running_requests(checkpoint: Path) -> None:
    engine = Engine(EngineConfig(model=str(checkpoint), max_num_seqs=1, max_model_len=256, max_loras=1, max_lora_rank=4))
    engine.start()
    gen, _ = await first_chunk(engine, long_request("x"))
    await asyncio.to_thread(engine.shutdown)
    rest = await drain(gen)
    assert rest[-1].finish_reason is FinishReason.ABORT
    with pytest.raises(Exception) as info:
        await engine.generate(long_request("y")).__anext__()
    assert type(info.value).__name__ == "EngineClosed"


async def test_chat_usage_counts(small_engine: Engine) -> None:
    req = GenerationRequest(request_id="usage", messages=[ChatMessage("user", "Say hi")],
                            sampling=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    chunks = await drain(small_engine.generate(req))
    assert chunks[-1].prompt_tokens == small_engine.count_tokens(req)
    assert chunks[-1].completion_tokens == 4 == sum(len(c.token_ids) for c in chunks)
