"""The vllm backend against a real vLLM CPU server and a real ``tensafe agent``: the backend
contract, vLLM's CPU cache rereading an adapter's files, residency and load from its metrics,
and reconciliation after the agent restarts. (The gateway over a vllm pool, vLLM killed and
restarted: test_vllm_pool.py.)"""
from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.backends import BackendRequest, LoraConfig, Sampling
from gateway.backends.errors import AdapterProblem, BackendOverloaded, BackendUnavailable
from gateway.backends.vllm import VllmBackend
from loadtests.vllm_procs import AGENT_TOKEN, AgentProcess, agent_beside
from tests.adapters.builders import SMOLLM2, lora_tensors

from .conftest import BASE
from .test_backend_contract import HELLO, BackendContract, collect, eventually, first_token, request

pytestmark = pytest.mark.slow
CONFIG = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def vllm_agent(tmp_path_factory, vllm_server):
    with agent_beside(tmp_path_factory.mktemp("agent"), vllm_server.url, max_adapters=2) as proc:
        yield proc


@pytest.fixture()
async def vllm_backend(vllm_server, vllm_agent):
    if vllm_agent.proc is None:
        vllm_agent.start()
    vllm_agent.clear()
    b = VllmBackend(vllm_server.url, vllm_agent.url, name="vllm-test", served_model=BASE, agent_token=AGENT_TOKEN,
                    max_num_seqs=vllm_server.settings.vllm.max_num_seqs, max_lora_rank=8, refresh_s=0.1)
    await b.start()
    yield b
    if vllm_agent.proc is not None:
        for adapter_id in b.adapters():  # our own leases do not stop our own unloads
            await b.unload_adapter(adapter_id)
    await b.close()
    vllm_agent.clear()


class TestVllmBackend(BackendContract):
    SEQUENCE_SLOTS = 4
    MAX_MODEL_LEN = 1024

    @pytest.fixture()
    def backend(self, vllm_backend):
        return vllm_backend

    async def test_queue_bound_raises_overloaded(self, backend):
        """vLLM queues what its batch cannot take (without a bound: the gateway's queue bounds
        what it sends); the queue shows in the backend's capacity, from vLLM's metrics."""
        streams = [backend.generate(request(f"q{i}", 60)) for i in range(self.SEQUENCE_SLOTS + 1)]
        firsts = [asyncio.ensure_future(first_token(s)) for s in streams]
        await eventually(lambda: backend.capacity().queue_depth == 1 and backend.capacity().free_sequence_slots == 0,
                         timeout_s=20)
        for f in firsts:
            f.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for s in streams:
            await s.aclose()
        await eventually(lambda: backend.capacity().free_sequence_slots == self.SEQUENCE_SLOTS
                         and backend.capacity().queue_depth == 0, timeout_s=20)


async def test_usage_finish_reasons_and_stops_come_back_exactly(vllm_backend, vllm_server):
    direct = httpx.post(vllm_server.url + "/v1/chat/completions", timeout=60, json={
        "model": BASE, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12, "temperature": 0})
    reply = direct.json()
    chunks = await collect(vllm_backend, BackendRequest("u", Sampling(max_tokens=12, temperature=0), messages=HELLO))
    assert "".join(c.text for c in chunks) == reply["choices"][0]["message"]["content"]
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (reply["usage"]["prompt_tokens"],
                                                                        reply["usage"]["completion_tokens"])
    assert chunks[-1].finish_reason == reply["choices"][0]["finish_reason"]
    words = "".join(c.text for c in chunks).split()
    stopped = await collect(vllm_backend, BackendRequest(
        "s", Sampling(max_tokens=12, temperature=0, stop=(words[1],)), messages=HELLO))
    assert stopped[-1].finish_reason == "stop" and words[1] not in "".join(c.text for c in stopped)
    ids = await collect(vllm_backend, BackendRequest("t", Sampling(max_tokens=3, temperature=0, ignore_eos=True),
                                                     prompt_token_ids=[1, 2, 3, 4]))
    assert ids[-1].prompt_tokens == 4 and ids[-1].completion_tokens == 3


async def test_vllm_rereads_the_files_of_an_adapter_its_cpu_cache_dropped(vllm_server, vllm_agent):
    """vLLM caches 2 adapters in RAM; a third makes it drop one, which it reads again from the
    agent's files when asked for: the outputs stay those of each adapter. (A server has one
    agent: the module's steps aside for one that holds three.)"""
    vllm_agent.clear()
    vllm_agent.kill()
    import shutil
    import tempfile
    from pathlib import Path

    shm = Path(tempfile.mkdtemp(prefix="tensafe-test-", dir="/dev/shm"))
    wide = AgentProcess(vllm_agent.workdir, shm, vllm_server.url, max_adapters=3)
    wide.start()
    backend = VllmBackend(vllm_server.url, wide.url, name="vllm-lru", served_model=BASE, agent_token=AGENT_TOKEN,
                          max_num_seqs=4, max_lora_rank=8)
    await backend.start()
    try:
        names = ["lru-a", "lru-b", "lru-c"]
        for i, name in enumerate(names):
            await backend.load_adapter(name, lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=20 + i), CONFIG)

        async def text(name: str) -> str:
            chunks = await collect(backend, BackendRequest(f"{name}-r", Sampling(max_tokens=8, temperature=0,
                                                                                 ignore_eos=True),
                                                           messages=HELLO, adapter_id=name))
            return "".join(c.text for c in chunks)

        first = [await text(n) for n in names]
        second = [await text(n) for n in names]  # each was evicted from vLLM's 2-adapter cache in between
        assert first == second and len(set(first)) == 3
    finally:
        await backend.close()
        wide.clear()
        wide.kill()
        shutil.rmtree(shm, ignore_errors=True)


async def test_residency_and_load_come_from_vllms_metrics(vllm_backend):
    await vllm_backend.load_adapter("metrics-a", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=3), CONFIG)
    assert vllm_backend.adapters() == ["metrics-a"]
    stream = vllm_backend.generate(BackendRequest("m", Sampling(max_tokens=80, temperature=0, ignore_eos=True),
                                                  messages=HELLO, adapter_id="metrics-a"))
    try:
        await first_token(stream)
        await eventually(lambda: vllm_backend.lora_running == ("metrics-a",), timeout_s=10)
        assert vllm_backend.capacity().free_sequence_slots == 3
    finally:
        await stream.aclose()
    await eventually(lambda: vllm_backend.lora_running == () and vllm_backend.capacity().free_sequence_slots == 4,
                     timeout_s=10)


async def test_a_restarted_agent_gives_back_what_it_holds(vllm_backend, vllm_agent):
    await vllm_backend.load_adapter("survivor", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=4), CONFIG)
    vllm_agent.kill()
    assert not (await vllm_backend.health()).ok
    with pytest.raises(Exception):
        await vllm_backend.load_adapter("x", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=5), CONFIG)
    vllm_agent.start()
    await eventually(lambda: vllm_backend.adapters() == ["survivor"], timeout_s=10)
    assert (await vllm_backend.health()).ok
    chunks = await collect(vllm_backend, BackendRequest("after", Sampling(max_tokens=3, temperature=0,
                                                                          ignore_eos=True),
                                                        messages=HELLO, adapter_id="survivor"))
    assert chunks[-1].completion_tokens == 3
    with pytest.raises(AdapterProblem) as exc:
        await vllm_backend.load_adapter("survivor", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=4), CONFIG)
    assert exc.value.kind == "exists"  # adopted: held, and leased to us again


async def test_a_full_agent_is_an_adapter_problem_not_an_outage(vllm_backend):
    for i in range(2):
        await vllm_backend.load_adapter(f"full-{i}", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=i), CONFIG)
    with pytest.raises(AdapterProblem) as exc:
        await vllm_backend.load_adapter("full-2", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=9), CONFIG)
    assert exc.value.kind == "slots_full"
    assert not isinstance(exc.value, BackendOverloaded)


async def test_a_lease_past_half_its_life_is_renewed_beside_the_request(vllm_server, vllm_agent):
    """Within the last half of its lease (but not its last sixth) a request goes to vLLM at once
    and the lease is renewed beside it; later, the renewal comes first. Shown with the agent
    down: the first request is served, the second cannot be."""
    if vllm_agent.proc is None:
        vllm_agent.start()
    vllm_agent.clear()
    b = VllmBackend(vllm_server.url, vllm_agent.url, name="vllm-lease", served_model=BASE, agent_token=AGENT_TOKEN,
                    max_num_seqs=4, max_lora_rank=8, lease_ttl_s=3.0)
    await b.start()
    short = BackendRequest("lease", Sampling(max_tokens=2, temperature=0, ignore_eos=True), messages=HELLO,
                           adapter_id="leased")
    try:
        await b.load_adapter("leased", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=6), CONFIG)
        await asyncio.sleep(1.7)  # 1.3 s of the lease left
        vllm_agent.kill()
        assert (await collect(b, short))[-1].completion_tokens == 2
        await asyncio.sleep(1.5)  # expired, as far as the backend knows
        with pytest.raises(BackendUnavailable):
            await collect(b, short)
    finally:
        vllm_agent.start()
        await eventually(lambda: b.adapters() == ["leased"], timeout_s=10)
        await b.unload_adapter("leased")
        await b.close()
        vllm_agent.clear()
