"""The fake LoRAX (fake_lorax.py) against its protocol: shapes, framing, errors and adapter
handling over a real uvicorn, and its greedy output against the engine itself."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

import engine as eng
from tests.adapters.builders import SMOLLM2, lora_tensors, peft_config, write_peft_dir
from tests.gateway.conftest import Server
from tests.gateway.fake_lorax import FakeLorax

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
TOKEN_KEYS = ["id", "text", "logprob", "special", "skipped"]
INFO_KEYS = ["model_id", "model_sha", "model_dtype", "model_device_type", "model_pipeline_tag",
             "max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_input_length", "max_total_tokens",
             "waiting_served_ratio", "max_batch_total_tokens", "max_waiting_tokens", "validation_workers",
             "eager_prefill", "version", "sha", "docker_label", "request_logger_url"]


@pytest.fixture(scope="module")
def lorax(checkpoint: Path) -> Iterator[tuple[FakeLorax, str]]:
    fake = FakeLorax(checkpoint)
    with Server(fake.app) as server:
        yield fake, server.url


@pytest.fixture()
async def api(lorax) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=lorax[1], timeout=60) as c:
        yield c


def events(body: str) -> list[dict]:
    """SSE events, checking LoRAX's framing: only ``data: <json>`` lines, blank-line separated."""
    assert body.endswith("\n\n")
    blocks = body[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), body
    assert "[DONE]" not in body
    return [json.loads(b.removeprefix("data: ")) for b in blocks]


async def gen(api: httpx.AsyncClient, inputs: str = PROMPT, **params) -> httpx.Response:
    return await api.post("/generate", json={"inputs": inputs, "parameters": params})


async def stream(api: httpx.AsyncClient, inputs: str = PROMPT, **params) -> httpx.Response:
    return await api.post("/generate_stream", json={"inputs": inputs, "parameters": params})


async def test_generate_details_match_the_engine(lorax, api, checkpoint):
    fake, _ = lorax
    ids = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(PROMPT).ids
    r = await gen(api, max_new_tokens=8, details=True)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["generated_text", "details"]
    d = body["details"]
    assert list(d) == ["finish_reason", "prompt_tokens", "generated_tokens", "skipped_tokens", "seed", "prefill",
                       "tokens"]
    assert d["prompt_tokens"] == len(ids) and d["skipped_tokens"] == 0 and d["seed"] is None and d["prefill"] == []
    assert d["generated_tokens"] == len(d["tokens"]) > 0
    for t in d["tokens"]:
        assert list(t) == TOKEN_KEYS and isinstance(t["id"], int) and isinstance(t["text"], str)
        assert t["logprob"] == 0.0 and isinstance(t["special"], bool) and t["skipped"] is False
    assert r.headers["x-prompt-tokens"] == str(len(ids)) and r.headers["x-generated-tokens"] == str(len(d["tokens"]))
    assert r.headers["x-total-tokens"] == str(len(ids) + len(d["tokens"]))
    assert r.headers["x-model-id"] == "smollm2-135m-instruct" and "x-adapter-id" not in r.headers

    # the engine itself, greedy, on the same token ids (another cache salt: no prefix reuse)
    request = eng.GenerationRequest("direct", eng.SamplingParams(max_tokens=8, temperature=0), prompt_token_ids=ids,
                                    cache_salt="direct")
    chunks = [c async for c in fake.engine.generate(request)]
    direct = [t for c in chunks for t in c.token_ids]
    assert [t["id"] for t in d["tokens"]] == direct
    assert body["generated_text"] == fake.engine.tokenizer.backend.decode(direct, skip_special_tokens=True)
    assert body["generated_text"] == "".join(t["text"] for t in d["tokens"] if not t["special"])
    expected = "length" if len(direct) == 8 else "eos_token"
    assert d["finish_reason"] == expected

    plain = await gen(api, max_new_tokens=8, temperature=None, do_sample=False, adapter_id="")
    assert plain.json() == {"generated_text": body["generated_text"]}  # no details key; null temperature is greedy
    assert "x-adapter-id" not in plain.headers  # "" is the base model
    full = await gen(api, max_new_tokens=8, return_full_text=True)
    assert full.json()["generated_text"] == PROMPT + body["generated_text"]


async def test_stream_framing_and_last_event(api):
    reference = (await gen(api, max_new_tokens=8, details=True)).json()
    r = await stream(api, max_new_tokens=8, details=True)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    evs = events(r.text)
    assert len(evs) == reference["details"]["generated_tokens"]
    for ev in evs[:-1]:
        assert ev == {"token": ev["token"], "generated_text": None, "details": None}
    last = evs[-1]
    assert list(last) == ["token", "generated_text", "details"]
    assert [e["token"] for e in evs] == reference["details"]["tokens"]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in evs if not e["token"]["special"])
    assert last["generated_text"] == reference["generated_text"]
    assert last["details"] == {"finish_reason": reference["details"]["finish_reason"],
                               "prompt_tokens": reference["details"]["prompt_tokens"],
                               "generated_tokens": len(evs), "seed": None}
    no_details = events((await stream(api, max_new_tokens=2)).text)
    assert no_details[-1]["details"] is None and isinstance(no_details[-1]["generated_text"], str)


async def test_eos_and_stop_sequence_finish_reasons(api):
    # chat-rendered input: the instruct model answers briefly and ends with <|im_end|>
    chat = "<|im_start|>user\nSay only the word yes.<|im_end|>\n<|im_start|>assistant\n"
    d = (await gen(api, chat, max_new_tokens=40, details=True)).json()["details"]
    assert d["finish_reason"] == "eos_token" and d["tokens"][-1]["special"] is True
    assert d["tokens"][-1]["text"] == "<|im_end|>"
    first = d["tokens"][0]["text"]
    s = (await gen(api, chat, max_new_tokens=40, details=True, stop=[first])).json()
    assert s["details"]["finish_reason"] == "stop_sequence" and s["details"]["generated_tokens"] == 1
    assert s["generated_text"] == first  # LoRAX keeps the stop sequence in the text


async def test_sampling_reports_its_seed(api):
    a = (await gen(api, max_new_tokens=6, do_sample=True, seed=42, details=True)).json()
    b = (await gen(api, max_new_tokens=6, do_sample=True, seed=42, details=True)).json()
    assert a["details"]["seed"] == 42 and a["generated_text"] == b["generated_text"]
    c = (await gen(api, max_new_tokens=1, temperature=0.7, details=True)).json()
    assert isinstance(c["details"]["seed"], int)  # a random one, reported because it sampled


async def test_validation_errors_as_json_and_as_sse(api, checkpoint):
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    n = len(tokenizer.encode(PROMPT).ids)
    cases = [
        ({"temperature": -1}, "`temperature` must be non-negative"),
        ({"top_p": 1.5}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"max_new_tokens": 1020},
         f"`inputs` tokens + `max_new_tokens` must be <= 1024. Given: {n} `inputs` tokens and 1020 `max_new_tokens`"),
    ]
    for params, message in cases:
        r = await gen(api, **params)
        expected = {"error": f"Input validation error: {message}", "error_type": "validation"}
        assert (r.status_code, r.json()) == (422, expected), params
        s = await stream(api, **params)
        assert s.status_code == 200 and events(s.text) == [expected], params
    empty = await gen(api, "")
    assert empty.json()["error"] == "Input validation error: `inputs` cannot be empty"
    text = "hi " * 1100
    long = await gen(api, text, max_new_tokens=None)
    given = len(tokenizer.encode(text).ids)
    assert long.json()["error"] == f"Input validation error: `inputs` must have less than 1023 tokens. Given: {given}"
    s = await stream(api, decoder_input_details=True)
    assert events(s.text)[0]["error"] == ("Input validation error: `decoder_input_details` == true is not "
                                          "supported when streaming tokens")
    # axum's extractor rejections: plain text, before the handler
    missing = await api.post("/generate", json={"parameters": {}})
    assert missing.status_code == 422 and missing.headers["content-type"].startswith("text/plain")
    assert missing.text == "Failed to deserialize the JSON body into the target type: missing field `inputs`"
    typed = await api.post("/generate", json={"inputs": "x", "parameters": {"stop": "x"}})
    assert typed.status_code == 422 and "parameters.stop: invalid type: string \"x\", expected a sequence" in typed.text
    bad = await api.post("/generate", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.text.startswith("Failed to parse the request body as JSON: ")
    no_ct = await api.post("/generate", content=b"{}", headers={"content-type": "text/plain"})
    assert (no_ct.status_code, no_ct.text) == (415, "Expected request with `Content-Type: application/json`")


async def test_overloaded(lorax, api):
    fake, _ = lorax
    fake.max_concurrent_requests = 0
    try:
        r = await gen(api, max_new_tokens=1)
        assert (r.status_code, r.json()) == (429, {"error": "Model is overloaded", "error_type": "overloaded"})
        s = await stream(api, max_new_tokens=1)
        assert s.status_code == 200 and events(s.text) == [r.json()]
    finally:
        fake.max_concurrent_requests = 8


async def test_disconnect_frees_the_slot(lorax, api):
    fake, _ = lorax
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 500, "ignore_eos_token": True}}
    async with api.stream("POST", "/generate_stream", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                assert "token" in json.loads(line[6:])
                break
    deadline = time.monotonic() + 5
    while fake.in_flight or fake.engine.capacity().free_sequence_slots != 4:
        assert time.monotonic() < deadline, "the aborted request still holds its slot"
        await asyncio.sleep(0.02)


async def test_local_adapter_loads_once_on_first_use(lorax, api, adapter_dirs):
    fake, _ = lorax
    path = str(adapter_dirs["support"])
    base = (await gen(api, max_new_tokens=4)).json()["generated_text"]
    assert fake.loads.count(path) == 0
    r = await gen(api, max_new_tokens=4, adapter_id=path, adapter_source="local")
    assert r.status_code == 200, r.text
    assert r.headers["x-adapter-id"] == path and r.headers["x-adapter-source"] == "local"
    assert fake.loads.count(path) == 1 and path in fake.engine.adapters()
    assert r.json()["generated_text"] != base  # random LoRA weights change the output
    again = await stream(api, max_new_tokens=4, adapter_id=path, adapter_source="local")
    assert events(again.text)[-1]["generated_text"] == r.json()["generated_text"]
    assert fake.loads.count(path) == 1


async def test_adapter_failures_are_424_generation(api, tmp_path, monkeypatch):
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(json.dumps(peft_config(4, ("q_proj",))))
    big = write_peft_dir(tmp_path / "rank-32", peft_config(32, ("q_proj",)), lora_tensors(SMOLLM2, 32, ("q_proj",)))
    missing_config = "No valid adapter config file found: tried None and None"
    cases = [
        (str(tmp_path / "absent"), "local", missing_config),
        (str(no_config), "local", missing_config),
        ("relative/adapter", "local", missing_config),
        (str(no_weights), "local", f"No local weights found in {no_weights} with extension .safetensors"),
        ("abcd", "local", "model_id 'abcd' is too short for prefix filtering"),
        (str(no_config), "ftp", f"Invalid source 'ftp' when downloading adapter '{no_config}'"),
        (str(big), "local", f"adapter {str(big)!r}: rank 32 exceeds max_lora_rank 16"),
    ]
    for adapter_id, source, message in cases:
        expected = {"error": f"Request failed during generation: Server error: {message}", "error_type": "generation"}
        r = await gen(api, max_new_tokens=1, adapter_id=adapter_id, adapter_source=source)
        assert (r.status_code, r.json()) == (424, expected), adapter_id
        s = await stream(api, max_new_tokens=1, adapter_id=adapter_id, adapter_source=source)
        assert events(s.text) == [expected], adapter_id
    # a relative id resolves under HUGGINGFACE_HUB_CACHE
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path))
    r = await gen(api, max_new_tokens=1, adapter_id="no-weights", adapter_source="local")
    assert r.json()["error"].endswith("No local weights found in no-weights with extension .safetensors")


async def test_deleted_adapter_works_while_active_and_fails_after_offload(lorax, api, adapter_dirs, tmp_path):
    fake, _ = lorax
    doomed = shutil.copytree(adapter_dirs["support"], tmp_path / "doomed-adapter")
    local = {"max_new_tokens": 1, "adapter_source": "local"}
    assert (await gen(api, adapter_id=str(doomed), **local)).status_code == 200
    shutil.rmtree(doomed)
    assert (await gen(api, adapter_id=str(doomed), **local)).status_code == 200  # still in memory
    assert fake.loads.count(str(doomed)) == 1
    for other in ("support", "legal"):  # two others fill both slots: the doomed one is offloaded
        assert (await gen(api, adapter_id=str(adapter_dirs[other]), **local)).status_code == 200
    assert str(doomed) in fake.offloads and str(doomed) not in fake.engine.adapters()
    r = await gen(api, adapter_id=str(doomed), **local)
    assert r.status_code == 424
    assert r.json()["error"] == ("Request failed during generation: Server error: No valid adapter config file "
                                 "found: tried None and None")


async def test_info_and_health(lorax, api):
    fake, _ = lorax
    info = (await api.get("/info")).json()
    assert list(info) == INFO_KEYS
    assert info["model_id"] == "smollm2-135m-instruct" and info["model_dtype"] == "torch.float32"
    assert info["model_device_type"] == "cpu" and info["max_concurrent_requests"] == 8
    assert (info["max_input_length"], info["max_total_tokens"], info["max_batch_total_tokens"]) == (1023, 1024, 4096)
    assert (info["max_best_of"], info["max_stop_sequences"], info["version"]) == (2, 4, "0.1.0")
    assert info["sha"] is None and info["eager_prefill"] is False and info["waiting_served_ratio"] == 1.2
    ok = await api.get("/health")
    assert (ok.status_code, ok.content) == (200, b"")
    fake.healthy = False
    try:
        bad = await api.get("/health")
        assert (bad.status_code, bad.json()) == (503, {"error": "unhealthy", "error_type": "healthcheck"})
    finally:
        fake.healthy = True
