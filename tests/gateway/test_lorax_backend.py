"""The lorax backend against a faithful LoRAX server (``fake_lorax``: LoRAX's REST protocol over
our own engine, loading adapters from the local paths it is given) and a real ``tensafe agent``
beside it in LoRAX mode: the backend contract, greedy outputs equal the embedded engine's for
the same adapter, the agent's files are what LoRAX reads, and a deleted file or a bad adapter
is an adapter problem."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from engine import EngineConfig
from gateway.backends import BackendRequest, Sampling
from gateway.backends.embedded import EmbeddedBackend
from gateway.backends.errors import AdapterProblem, BadRequest, ContextTooLong
from gateway.backends.lorax import LoraxBackend
from loadtests.vllm_procs import AGENT_TOKEN, agent_beside
from tests.adapters.builders import SMOLLM2, lora_tensors

from .conftest import BASE, Server
from .fake_lorax import FakeLorax
from .test_backend_contract import CONFIG, HELLO, BackendContract, collect, eventually, request

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lorax_server(checkpoint):
    fake = FakeLorax(checkpoint, max_concurrent_requests=3, max_batch=2, max_total_tokens=1024,
                     max_input_length=1023, max_active_adapters=2, max_lora_rank=8)
    with Server(fake.app) as server:
        server.fake = fake
        yield server


@pytest.fixture(scope="module")
def lorax_agent(tmp_path_factory, lorax_server):
    with agent_beside(tmp_path_factory.mktemp("lorax-agent"), lorax_server.url, server="lorax",
                      max_adapters=2) as proc:
        yield proc


@pytest.fixture()
async def lorax_backend(lorax_server, lorax_agent, checkpoint):
    if lorax_agent.proc is None:
        lorax_agent.start()
    lorax_agent.clear()
    b = LoraxBackend(lorax_server.url, lorax_agent.url, name="lorax-test", served_model=BASE,
                     tokenizer_dir=str(checkpoint), agent_token=AGENT_TOKEN, max_num_seqs=2, max_lora_rank=8,
                     max_active_adapters=2, refresh_s=0.1)
    await b.start()
    yield b
    if lorax_agent.proc is not None:
        for adapter_id in b.adapters():
            await b.unload_adapter(adapter_id)
    await b.close()
    lorax_agent.clear()


class TestLoraxBackend(BackendContract):
    SEQUENCE_SLOTS = 2
    MAX_MODEL_LEN = 1024

    @pytest.fixture()
    def backend(self, lorax_backend):
        return lorax_backend

    async def test_prompt_and_token_ids(self, backend):
        """LoRAX takes text: a prompt is served, token ids are refused by name."""
        chunks = await collect(backend, BackendRequest("p", Sampling(max_tokens=2, temperature=0, ignore_eos=True),
                                                       prompt="Once upon a time"))
        assert chunks[-1].completion_tokens == 2 and chunks[-1].prompt_tokens == 4
        with pytest.raises(BadRequest) as exc:
            await collect(backend, BackendRequest("t", Sampling(max_tokens=2), prompt_token_ids=[1, 2, 3, 4]))
        assert exc.value.param == "prompt"

    async def test_sampling_extensions(self, backend):
        """LoRAX has ignore_eos_token, top_k and repetition_penalty; not min_tokens or stop_token_ids."""
        assert backend.extensions == {"ignore_eos", "top_k", "repetition_penalty"}
        chunks = await collect(backend, BackendRequest("eos", Sampling(max_tokens=40, temperature=0, ignore_eos=True),
                                                       messages=HELLO))
        assert chunks[-1].completion_tokens == 40 and chunks[-1].finish_reason == "length"
        penalised = await collect(backend, BackendRequest("rep", Sampling(max_tokens=40, temperature=0,
                                                                          ignore_eos=True, repetition_penalty=1.8),
                                                          messages=HELLO))
        assert "".join(c.text for c in penalised) != "".join(c.text for c in chunks)

    async def test_context_limit(self, backend):
        with pytest.raises(ContextTooLong):
            await collect(backend, request("long", 5000))


@pytest.fixture(scope="module")
def reference_engine(checkpoint):
    b = EmbeddedBackend(EngineConfig(model=str(checkpoint), device="cpu", dtype="float32", max_num_seqs=1,
                                     max_model_len=1024, max_loras=1, max_lora_rank=8, prefix_cache_tokens=0))
    asyncio.run(b.start())
    yield b
    asyncio.run(b.close())


async def test_greedy_outputs_equal_the_embedded_engines(lorax_backend, lorax_server, reference_engine):
    tensors = lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=11)
    await lorax_backend.load_adapter("same", tensors, CONFIG)
    await reference_engine.load_adapter("same", tensors, CONFIG)
    try:
        for adapter in ("same", None):
            sampling = Sampling(max_tokens=16, temperature=0)
            ours = await collect(lorax_backend, BackendRequest("g", sampling, messages=HELLO, adapter_id=adapter))
            reference = await collect(reference_engine, BackendRequest("g", sampling, messages=HELLO,
                                                                       adapter_id=adapter))
            assert "".join(c.text for c in ours) == "".join(c.text for c in reference)
            assert (ours[-1].prompt_tokens, ours[-1].completion_tokens, ours[-1].finish_reason) == \
                (reference[-1].prompt_tokens, reference[-1].completion_tokens, reference[-1].finish_reason)
        with_adapter = await collect(lorax_backend, BackendRequest("g", Sampling(max_tokens=16, temperature=0),
                                                                   messages=HELLO, adapter_id="same"))
        base = await collect(lorax_backend, BackendRequest("g", Sampling(max_tokens=16, temperature=0),
                                                           messages=HELLO))
        assert "".join(c.text for c in with_adapter) != "".join(c.text for c in base)  # the adapter did something
        path = lorax_backend.agent.paths["same"]
        assert path in lorax_server.fake.loads  # LoRAX read the agent's files, from the agent's directory
        assert Path(path).parent == Path(lorax_server.fake.loads[-1]).parent
    finally:
        await reference_engine.unload_adapter("same")


async def test_a_deleted_file_is_an_adapter_problem(lorax_backend, lorax_agent):
    await lorax_backend.load_adapter("gone", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=12), CONFIG)
    shutil.rmtree(lorax_backend.agent.paths["gone"])  # before LoRAX's first use: it has nothing to load
    with pytest.raises(AdapterProblem) as exc:
        await collect(lorax_backend, request("gone", 2, adapter="gone"))
    assert exc.value.adapter_id == "gone"


async def test_a_bad_adapter_is_an_adapter_problem(lorax_backend):
    wrong = {name: t[:, :-1] if "lora_A" in name else t
             for name, t in lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=13).items()}
    await lorax_backend.load_adapter("bad", wrong, CONFIG)  # the agent stores bytes; LoRAX reads them
    with pytest.raises(AdapterProblem) as exc:
        await collect(lorax_backend, request("bad", 2, adapter="bad"))
    assert exc.value.adapter_id == "bad"
    chunks = await collect(lorax_backend, request("after", 2))  # LoRAX still serves the rest
    assert chunks[-1].completion_tokens == 2


async def test_a_restarted_agent_deletes_its_files_and_gateways_send_again(lorax_backend, lorax_agent):
    """LoRAX lists no adapters, so an agent that restarts cannot tell which files still serve:
    it deletes them all, and the gateway's next load writes them again."""
    tensors = lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=14)
    await lorax_backend.load_adapter("again", tensors, CONFIG)
    assert list(lorax_agent.agent_dir.iterdir())
    lorax_agent.kill()
    lorax_agent.start()
    await eventually(lambda: lorax_backend.adapters() == [], timeout_s=10)
    assert [p for p in lorax_agent.agent_dir.iterdir() if not p.name.startswith(".")] == []
    await lorax_backend.load_adapter("again", tensors, CONFIG)
    chunks = await collect(lorax_backend, request("again", 2, adapter="again"))
    assert chunks[-1].completion_tokens == 2


def test_the_gateway_over_a_lorax_pool(tmp_path, lorax_server, lorax_agent, adapter_dirs):
    """A pool of kind lorax from settings: the official client's chat on a tenant-visible adapter
    goes through the agent to LoRAX; what LoRAX cannot honour is refused by name."""
    import json

    import openai

    from gateway.app import create_app

    from .conftest import API_KEY, settings

    lorax_agent.clear()
    pools = [{"name": "default", "kind": "lorax", "urls": [lorax_server.url], "token": AGENT_TOKEN,
              "options": {"agent_url": lorax_agent.url, "max_num_seqs": 2, "max_lora_rank": 8}}]
    s = settings(tmp_path, pools=json.dumps(pools), adapters=f"support={adapter_dirs['support']}")
    with Server(create_app(s)) as gateway, openai.OpenAI(base_url=gateway.url + "/v1", api_key=API_KEY,
                                                         max_retries=0) as client:
        reply = client.chat.completions.create(model="support", messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
        with lorax_agent.client() as c:
            (held,) = c.get("/v1/adapters").json()["adapters"]
        assert held["path"] in lorax_server.fake.loads  # LoRAX read the agent's files
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="support", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=5, extra_body={"min_tokens": 2})
        assert exc.value.body["param"] == "min_tokens"
    lorax_agent.kill()  # the gateway's lease outlives it: a restarted agent (LoRAX mode) starts empty
    lorax_agent.start()


async def test_active_adapters_are_the_most_recently_used_ones_held(lorax_backend):
    tensors = lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=15)
    for name in ("one", "two"):
        await lorax_backend.load_adapter(name, tensors, CONFIG)
    for name in ("one", "two", "one"):
        await collect(lorax_backend, request(f"use-{name}", 1, adapter=name))
    assert lorax_backend.active_adapters == ("two", "one")
    lorax_backend.max_active_adapters = 1
    assert lorax_backend.active_adapters == ("one",)
    await lorax_backend.unload_adapter("one")
    lorax_backend.max_active_adapters = 2
    assert lorax_backend.active_adapters == ("two",)
