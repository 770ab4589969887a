"""``tensafe worker`` as a real process on the real model, reached over real HTTP: the whole
backend contract through RemoteBackend, the token gate, disconnects, vLLM-style metrics,
adapters that stay in memory, a worker killed under a stream, and the official openai client
through ``tensafe serve --backend tensafe`` in front of it. One worker serves the module."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as save_safetensors

from gateway.backends import BackendRequest, LoraConfig, Message, Sampling
from gateway.backends.base import EXTENSIONS
from gateway.backends.embedded import EmbeddedBackend
from gateway.backends.errors import AdapterProblem, BackendUnavailable, BadRequest
from gateway.backends.remote import RemoteBackend
from gateway.bearer import TokenGate
from gateway.settings import Settings
from gateway.worker import wire
from tests.adapters.builders import ALL_MODULES, SMOLLM2, lora_tensors, peft_config, write_peft_dir

from .conftest import BASE
from .test_backend_contract import CONFIG, BackendContract, collect, eventually, first_token, request
from .test_serve import Proc, free_port

pytestmark = pytest.mark.slow

TOKENS = ("wtok-first-4f1c9a0d", "wtok-second-8b2e77c3")
#: the contract's configuration (BackendContract's docstring)
ENGINE = {"max_num_seqs": 2, "max_queue": 1, "max_model_len": 128, "max_loras": 2, "max_lora_rank": 8}
MAX_ADAPTER_BYTES = 8 << 20
ENDPOINTS = [("POST", "/v1/generate"), ("POST", "/v1/abort"), ("PUT", "/v1/adapters/x"),
             ("DELETE", "/v1/adapters/x"), ("GET", "/v1/adapters"), ("GET", "/v1/capacity"),
             ("GET", "/v1/model-config"), ("GET", "/metrics")]


def auth(token: str = TOKENS[0]) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def start_worker(tmp: Path, checkpoint: Path) -> Proc:
    """A worker running in its own empty directory, with its own empty TMPDIR."""
    for name in ("cwd", "tmp"):
        (tmp / name).mkdir(exist_ok=True)
    flags = [x for name, value in ENGINE.items() for x in ("--" + name.replace("_", "-"), str(value))]
    return Proc(tmp, "--model", str(checkpoint), *flags, "--worker-max-adapter-bytes", str(MAX_ADAPTER_BYTES),
                "--log-level", "info", verb="worker", ready="/health",
                env={"TENSAFE_WORKER_TOKENS": ",".join(TOKENS), "TMPDIR": str(tmp / "tmp")}, cwd=tmp / "cwd")


def stop(proc: Proc) -> None:
    if proc.p.poll() is None:
        proc.stop()
    else:
        proc.wait()


@pytest.fixture(scope="module")
def worker(tmp_path_factory, checkpoint):
    tmp = tmp_path_factory.mktemp("worker")
    proc = start_worker(tmp, checkpoint)
    proc.tmp = tmp  # type: ignore[attr-defined]
    yield proc
    stop(proc)


@pytest.fixture()
async def remote(worker):
    backend = RemoteBackend(worker.url, TOKENS[0], name="worker")
    await backend.start()
    yield backend
    await backend.close()


class TestRemoteBackend(BackendContract):
    @pytest.fixture()
    def backend(self, remote):
        return remote


def test_every_endpoint_but_health_needs_one_of_the_tokens(worker):
    wrong = [None, "Bearer", f"Bearer {TOKENS[0]}x", f"Bearer {TOKENS[0][:-1]}", TOKENS[0],
             f"Basic {TOKENS[1]}", f"bearer {TOKENS[1]}", "Bearer wtok-wrong-0000"]
    with httpx.Client(base_url=worker.url, timeout=10) as http:
        for method, path in ENDPOINTS:
            for header in wrong:
                r = http.request(method, path, content=b"{}", headers={} if header is None else {"authorization": header})
                assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized", (method, path, header)
                assert wire.CAPACITY_HEADER not in r.headers
        assert http.get("/health").status_code == 200
        assert http.get("/health", headers={"authorization": "Bearer wtok-wrong-0000"}).status_code == 200
        for token in TOKENS:
            r = http.get("/v1/capacity", headers=auth(token))
            assert r.status_code == 200 and r.json()["max_lora_rank"] == 8 and wire.CAPACITY_HEADER in r.headers
            assert http.get("/metrics", headers=auth(token)).status_code == 200
    logs = "".join(worker.stderr + worker.stdout)
    assert "Uvicorn running" in logs  # the logs are read, so the next line can fail
    assert all(token not in logs for token in TOKENS) and "wtok-wrong" not in logs
    settings = Settings.load({"worker_tokens": ",".join(TOKENS), "remote_token": TOKENS[1]}, env={})
    for text in (repr(settings), repr(RemoteBackend(worker.url, TOKENS[1], name="r")), repr(TokenGate(None, TOKENS))):
        assert all(token not in text for token in TOKENS)


def test_a_bad_body_is_a_400_naming_the_field(worker):
    with httpx.Client(base_url=worker.url, headers=auth(), timeout=10) as http:
        r = http.post("/v1/generate", json={"request_id": "b", "prompt": "hi", "sampling": {"max_tokens": "3"}})
        assert r.status_code == 400 and r.json()["error"] == {
            "kind": "bad_request", "message": "max_tokens must be int", "param": "max_tokens", "adapter_id": None,
            "reason": None}
        r = http.post("/v1/generate", content=b'{"request_id": "b", "prompt": NaN}')
        assert r.status_code == 400 and r.json()["error"]["kind"] == "bad_request"
        r = http.put("/v1/adapters/x", content=b"not safetensors", headers={wire.LORA_HEADER: wire.lora_header(CONFIG)})
        assert r.status_code == 409 and r.json()["error"]["reason"] == "invalid"
        assert http.get("/v1/adapters").json() == {"adapters": []}


async def test_an_adapter_through_the_worker_generates_what_it_does_in_process(remote, engines):
    modules = ("q_proj", "v_proj", "down_proj")
    tensors = lora_tensors(SMOLLM2, 8, modules, seed=11)
    config = LoraConfig(rank=8, alpha=16.0, target_modules=modules)
    engine = engines(**ENGINE)
    local = EmbeddedBackend(engine.config, engine=engine)

    def req(rid: str, adapter: str | None) -> BackendRequest:
        return BackendRequest(rid, Sampling(max_tokens=12, temperature=0, ignore_eos=True),
                              messages=(Message("user", "Name three colours."),), adapter_id=adapter,
                              cache_salt="greedy")

    await remote.load_adapter("tenant/same", tensors, config)
    await local.load_adapter("tenant/same", tensors, config)
    try:
        assert remote.adapters() == ["tenant/same"]
        through = await collect(remote, req("r", "tenant/same"))
        here = await collect(local, req("l", "tenant/same"))
        base = await collect(remote, req("b", None))
    finally:
        await remote.unload_adapter("tenant/same")
        await local.unload_adapter("tenant/same")
    text = "".join(c.text for c in through)
    assert text == "".join(c.text for c in here) and through[-1].completion_tokens == 12
    assert text != "".join(c.text for c in base)  # the adapter did change what the model says


def test_a_client_that_leaves_mid_stream_frees_its_slot_at_once(worker):
    def body(rid: str, max_tokens: int) -> dict:
        return {"request_id": rid, "messages": [{"role": "user", "content": "Say hello."}],
                "sampling": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}

    with httpx.Client(base_url=worker.url, headers=auth(), timeout=30) as http:
        started = time.monotonic()
        assert http.post("/v1/generate", json=body("measure", 30)).status_code == 200
        per_token = (time.monotonic() - started) / 30
        with http.stream("POST", "/v1/generate", json=body("leaving", 90)) as r:
            assert r.status_code == 200 and r.headers["content-type"] == wire.NDJSON
            lines = r.iter_lines()
            read = [json.loads(next(lines)) for _ in range(7)]
            assert read[0] == {"text": "", "prompt_tokens": read[1]["prompt_tokens"], "completion_tokens": 0,
                               "finish_reason": None}  # the acceptance
            assert read[-1]["completion_tokens"] == 6 and read[-1]["finish_reason"] is None
            assert http.get("/v1/capacity").json()["free_sequence_slots"] == 1
        left = time.monotonic()  # the response is closed mid-body: the connection goes
        while http.get("/v1/capacity").json()["free_sequence_slots"] != 2:
            assert time.monotonic() - left < 10
            time.sleep(0.005)
        freed = time.monotonic() - left
    # well before the tokens still due (at least 60 of them) could have been generated
    assert freed < 0.5 * per_token * 60, (freed, per_token)


async def test_metrics_read_like_vllms(remote, worker):
    await remote.load_adapter("metrics-a", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj"), seed=2), CONFIG)
    stream = remote.generate(request("m", 60, adapter="metrics-a"))
    try:
        await first_token(stream)
        async with httpx.AsyncClient(base_url=worker.url, headers=auth(TOKENS[1])) as http:
            r = await http.get("/metrics")
    finally:
        await stream.aclose()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    (info,) = families["vllm:lora_requests_info"].samples
    assert info.labels == {"running_lora_adapters": "metrics-a", "waiting_lora_adapters": "", "max_lora": "2"}
    assert abs(info.value - time.time()) < 60
    values = {name: families[f"vllm:{name}"].samples[0] for name in
              ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}
    assert {name: s.value for name, s in values.items()} == {"num_requests_running": 1, "num_requests_waiting": 0,
                                                             "kv_cache_usage_perc": 0.5}
    assert values["num_requests_running"].labels == {"model_name": BASE}
    await eventually(lambda: remote.capacity().free_sequence_slots == 2 and not remote.capacity().queue_depth)
    await remote.unload_adapter("metrics-a")


def _written(pid: int) -> int:
    """Bytes the process has passed to write(2) and friends, on any file anywhere, including
    files deleted since and tmpfs (sockets do not count: asyncio sends on them)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["wchar"])


async def test_an_adapter_is_never_written_to_a_file(remote, worker):
    tensors = lora_tensors(SMOLLM2, 8, ALL_MODULES, seed=4)
    size = len(save_safetensors(tensors))
    before = _written(worker.p.pid)
    await remote.load_adapter("in-memory", tensors, LoraConfig(rank=8, alpha=16.0, target_modules=ALL_MODULES))
    chunks = await collect(remote, request("with-in-memory", 2, adapter="in-memory"))
    written = _written(worker.p.pid) - before
    await remote.unload_adapter("in-memory")
    assert chunks[-1].completion_tokens == 2 and size > 4 << 20
    assert written < size // 20, (written, size)  # log lines only
    tmp: Path = worker.tmp  # type: ignore[attr-defined]
    assert not any((tmp / "cwd").iterdir()) and not any((tmp / "tmp").iterdir()) and not (tmp / "data").exists()


async def test_an_adapter_past_the_body_limit_is_refused(remote, worker):
    tensors = lora_tensors(SMOLLM2, 8, ALL_MODULES, dtype=torch.float32)  # 10 MiB, past the worker's 8 MiB
    with pytest.raises(AdapterProblem) as caught:  # by the client, before uploading
        await remote.load_adapter("huge", tensors, LoraConfig(rank=8, alpha=16.0, target_modules=ALL_MODULES))
    assert caught.value.kind == "invalid" and f"worker_max_adapter_bytes {MAX_ADAPTER_BYTES}" in str(caught.value)
    with httpx.Client(base_url=worker.url, headers=auth(), timeout=10) as http:  # and by the worker
        r = http.put("/v1/adapters/huge", content=save_safetensors(tensors),
                     headers={wire.LORA_HEADER: wire.lora_header(CONFIG)})
        assert r.status_code == 413 and r.json()["error"]["reason"] == "invalid"
        assert f"limit of {MAX_ADAPTER_BYTES} bytes" in r.json()["error"]["message"]
        assert http.get("/v1/adapters").json() == {"adapters": []}


async def test_a_killed_worker_is_unavailable(tmp_path, checkpoint):
    proc = start_worker(tmp_path, checkpoint)
    backend = RemoteBackend(proc.url, TOKENS[1], name="doomed", refresh_s=0.05)
    try:
        await backend.start()
        assert (await backend.health()).ok
        stream = backend.generate(request("cut", 60))
        await anext(stream)
        proc.p.kill()
        proc.wait()
        with pytest.raises(BackendUnavailable):
            async for _ in stream:
                pass
        with pytest.raises(BackendUnavailable):
            await collect(backend, request("after", 2))
        with pytest.raises(BackendUnavailable):
            await backend.load_adapter("x", lora_tensors(SMOLLM2, 4, ("q_proj", "v_proj")), CONFIG)
        health = await backend.health()
        assert not health.ok and "unreachable" in health.detail
        await eventually(lambda: backend.capacity().free_sequence_slots == 0)
    finally:
        await backend.close()
        stop(proc)
    nobody = RemoteBackend(f"http://127.0.0.1:{free_port()}", TOKENS[0], name="nobody")
    with pytest.raises(BackendUnavailable):
        await nobody.start()
    with pytest.raises(BackendUnavailable):
        await collect(nobody, request("never", 2))


async def test_a_wrong_token_is_unavailable_and_a_rank_too_large_is_refused_before_upload(worker, remote):
    wrong = RemoteBackend(worker.url, "wtok-wrong-0000", name="wrong")
    with pytest.raises(BackendUnavailable, match="401"):
        await wrong.start()
    big = LoraConfig(rank=16, alpha=16.0, target_modules=("q_proj",))
    with pytest.raises(AdapterProblem) as caught:
        await remote.load_adapter("big", lora_tensors(SMOLLM2, 16, ("q_proj",)), big)
    assert caught.value.kind == "rank_too_large" and "16 exceeds max_lora_rank 8" in str(caught.value)


def test_the_openai_client_through_a_gateway_in_front_of_a_worker(worker, tmp_path):
    modules = ("q_proj", "v_proj")
    peft = write_peft_dir(tmp_path / "helper", peft_config(4, modules, alpha=8), lora_tensors(SMOLLM2, 4, modules))
    gateway = Proc(tmp_path, "--backend", "tensafe", "--remote-url", worker.url, "--api-key", "tsk-remote",
                   "--adapters", f"helper={peft}", env={"TENSAFE_REMOTE_TOKEN": TOKENS[1]})
    try:
        assert httpx.get(worker.url + "/v1/adapters", headers=auth()).json() == {"adapters": ["local:helper"]}
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="tsk-remote", max_retries=0)
        reply = client.chat.completions.create(model=BASE, max_tokens=5, temperature=0,
                                               messages=[{"role": "user", "content": "Say hello."}])
        assert reply.usage.completion_tokens == 5 and reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "length"
        stream = client.chat.completions.create(model="helper", max_tokens=4, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "Say hello."}])
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model == "helper"
    finally:
        assert gateway.stop() == 0
        # the gateway leaves its adapters loaded in the worker it shares with the other tests
        httpx.delete(worker.url + "/v1/adapters/local%3Ahelper", headers=auth())
    assert TOKENS[1] not in "".join(gateway.stderr + gateway.stdout)


async def test_tokenizing_through_the_worker_is_the_engines(remote, engines):
    engine = engines(**ENGINE)
    local = EmbeddedBackend(engine.config, engine=engine)
    chat = (Message("user", "Say hello."),)
    for kwargs in ({"prompt": "Hello, world!", "add_special_tokens": True},
                   {"messages": chat}, {"messages": chat, "add_generation_prompt": False, "with_strings": True}):
        there, here = await remote.tokenize(**kwargs), await local.tokenize(**kwargs)
        assert there == here and there.ids
    ids = (await local.tokenize(messages=chat)).ids
    assert await remote.detokenize(ids) == await local.detokenize(ids)
    assert remote.extensions == local.extensions == EXTENSIONS  # as the worker reported
    with pytest.raises(BadRequest) as exc:
        await remote.detokenize([10**7])
    assert exc.value.param == "tokens"
