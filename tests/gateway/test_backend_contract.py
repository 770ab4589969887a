"""One contract for every Backend, rerun per implementation by overriding the ``backend``
fixture (the real embedded engine and the null backend here; a real ``tensafe worker`` through
RemoteBackend in test_worker.py)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import torch

from gateway.backends import Backend, BackendRequest, LoraConfig, Message, Sampling
from gateway.backends.embedded import EmbeddedBackend
from gateway.backends.errors import AdapterProblem, BackendOverloaded, BadRequest, ContextTooLong
from gateway.backends.null import NullBackend
from tests.adapters.builders import SMOLLM2, lora_tensors

HELLO = (Message("user", "Say hello."),)
CONFIG = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def request(rid: str, max_tokens: int = 4, adapter: str | None = None, **kw) -> BackendRequest:
    return BackendRequest(request_id=rid, sampling=Sampling(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                          messages=HELLO, adapter_id=adapter, **kw)


async def collect(backend: Backend, req: BackendRequest) -> list:
    return [c async for c in backend.generate(req)]


async def first_token(stream) -> object:
    """The first chunk with a token, past the backend's acceptance."""
    while (chunk := await anext(stream)).completion_tokens == 0 and chunk.finish_reason is None:
        pass
    return chunk


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for ``condition``. A backend's state may reach its ``capacity()`` a moment after the
    event (a remote worker's snapshot follows each answer and a refresh twice a second)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class BackendContract:
    """Subclasses provide ``backend`` (started, ``SEQUENCE_SLOTS`` sequence slots, max_queue 1,
    2 adapter slots, max_lora_rank 8, a context of ``MAX_MODEL_LEN``)."""

    SEQUENCE_SLOTS = 2
    MAX_MODEL_LEN = 128

    async def test_generates_counted_chunks(self, backend):
        chunks = await collect(backend, request("a", 5))
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 5
        assert [c.completion_tokens for c in chunks] == sorted(c.completion_tokens for c in chunks)
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert chunks[0].prompt_tokens > 0 and "".join(c.text for c in chunks)

    async def test_prompt_and_token_ids(self, backend):
        chunks = await collect(backend, BackendRequest("p", Sampling(max_tokens=2, temperature=0, ignore_eos=True),
                                                       prompt="Once upon a time"))
        assert chunks[-1].completion_tokens == 2
        chunks = await collect(backend, BackendRequest("t", Sampling(max_tokens=2, ignore_eos=True),
                                                       prompt_token_ids=[1, 2, 3, 4]))
        assert chunks[-1].prompt_tokens == 4

    async def test_acceptance_comes_first_even_while_queued(self, backend):
        """The first chunk is the acceptance (no text, no tokens, the prompt counted), sent
        before the first token, also for a request that must wait for a sequence slot."""
        running = [backend.generate(request(f"r{i}", 60)) for i in range(self.SEQUENCE_SLOTS)]
        for s in running:
            await first_token(s)
        queued = backend.generate(request("queued", 3))
        accepted = await asyncio.wait_for(anext(queued), 10)
        assert (accepted.text, accepted.completion_tokens, accepted.finish_reason) == ("", 0, None)
        assert accepted.prompt_tokens > 0
        for s in running:
            await s.aclose()
        rest = [c async for c in queued]
        assert rest[-1].completion_tokens == 3 and rest[-1].finish_reason == "length"

    async def test_sampling_extensions(self, backend):
        assert {"ignore_eos", "min_tokens"} <= backend.extensions
        free = Sampling(max_tokens=40, temperature=0, min_tokens=30)
        chunks = await collect(backend, BackendRequest("min", free, messages=HELLO))
        assert chunks[-1].completion_tokens >= 30
        with pytest.raises(BadRequest) as exc:
            await collect(backend, BackendRequest("bad", Sampling(max_tokens=4, min_tokens=5), messages=HELLO))
        assert exc.value.param == "min_tokens"

    async def test_context_limit(self, backend):
        with pytest.raises(ContextTooLong):
            await collect(backend, request("long", 5000))

    async def test_queue_bound_raises_overloaded(self, backend):
        streams = [backend.generate(request(f"q{i}", 60)) for i in range(3)]
        firsts = [asyncio.ensure_future(first_token(s)) for s in streams[:2]]
        await asyncio.wait(firsts, timeout=30)
        # two running, then one waiting fills the queue; the next is refused at once
        waiting = asyncio.ensure_future(first_token(streams[2]))
        await eventually(lambda: backend.capacity().queue_depth == 1)
        with pytest.raises(BackendOverloaded):
            await collect(backend, request("refused", 2))
        assert backend.capacity().queue_depth == 1
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        for s in streams:
            await s.aclose()
        for _ in range(100):
            if backend.capacity().free_sequence_slots == 2:
                break
            await asyncio.sleep(0.05)
        assert backend.capacity().free_sequence_slots == 2 and backend.capacity().queue_depth == 0

    async def test_closing_the_stream_frees_the_slot(self, backend):
        slots = self.SEQUENCE_SLOTS
        stream = backend.generate(request("c", 60))
        await first_token(stream)
        await eventually(lambda: backend.capacity().free_sequence_slots == slots - 1)
        await stream.aclose()
        await eventually(lambda: backend.capacity().free_sequence_slots == slots)

    async def test_adapter_slots(self, backend):
        tensors = lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=3)
        await backend.load_adapter("x", tensors, CONFIG)
        await backend.load_adapter("y", tensors, CONFIG)
        assert sorted(backend.adapters()) == ["x", "y"] and backend.capacity().free_adapter_slots == 0
        with pytest.raises(AdapterProblem) as exc:
            await backend.load_adapter("z", tensors, CONFIG)
        assert exc.value.kind == "slots_full"
        with pytest.raises(AdapterProblem) as exc:
            await backend.load_adapter("x", tensors, CONFIG)
        assert exc.value.kind == "exists"
        chunks = await collect(backend, request("with-x", 3, adapter="x"))
        assert chunks[-1].completion_tokens == 3
        stream = backend.generate(request("hold-x", 60, adapter="x"))
        await first_token(stream)
        with pytest.raises(AdapterProblem) as exc:
            await backend.unload_adapter("x")
        assert exc.value.kind == "in_use"
        await stream.aclose()
        for _ in range(100):
            try:
                await backend.unload_adapter("x")
                break
            except AdapterProblem:
                await asyncio.sleep(0.02)
        await backend.unload_adapter("y")
        assert backend.adapters() == []
        with pytest.raises(AdapterProblem) as exc:
            await backend.unload_adapter("x")
        assert exc.value.kind == "not_found"

    async def test_rank_above_maximum(self, backend):
        big = LoraConfig(rank=16, alpha=16.0, target_modules=("q_proj",))
        tensors = lora_tensors(SMOLLM2, 16, ("q_proj",))
        with pytest.raises(AdapterProblem) as exc:
            await backend.load_adapter("big", tensors, big)
        assert exc.value.kind == "rank_too_large"
        with pytest.raises(AdapterProblem) as exc:
            backend.prepare_adapter("big", tensors, big)
        assert exc.value.kind == "rank_too_large"

    async def test_prepared_adapter_loads_and_keeps_the_tensor_names(self, backend):
        tensors = lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=5)
        prepared = backend.prepare_adapter("p", tensors, CONFIG)
        assert set(prepared) == set(tensors)
        name = next(iter(tensors))
        assert torch.equal(prepared[name].float(), tensors[name].float())
        await backend.load_adapter("p", prepared, CONFIG)
        chunks = await collect(backend, request("with-p", 2, adapter="p"))
        assert chunks[-1].completion_tokens == 2
        await backend.unload_adapter("p")

    async def test_health_and_capacity(self, backend):
        health = await backend.health()
        assert health.ok and health.max_model_len == self.MAX_MODEL_LEN
        cap = backend.capacity()
        slots = self.SEQUENCE_SLOTS
        assert (cap.max_sequence_slots, cap.max_adapter_slots, cap.free_sequence_slots) == (slots, 2, slots)
        assert isinstance(backend, Backend)


class TestNullBackend(BackendContract):
    @pytest.fixture()
    async def backend(self):
        b = NullBackend(tokens=16, token_delay_s=0.01, max_num_seqs=2, max_queue=1, max_model_len=128, max_loras=2,
                        max_lora_rank=8)
        await b.start()
        yield b
        await b.close()


@pytest.fixture(scope="module")
def engine_backend(checkpoint):
    from engine import EngineConfig

    b = EmbeddedBackend(EngineConfig(model=str(checkpoint), max_num_seqs=2, max_queue=1, max_model_len=128,
                                     max_loras=2, max_lora_rank=8, prefix_cache_tokens=0))
    asyncio.run(b.start())
    yield b
    asyncio.run(b.close())


class TestEmbeddedBackend(BackendContract):
    @pytest.fixture()
    def backend(self, engine_backend):
        return engine_backend
