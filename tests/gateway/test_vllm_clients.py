"""What a client written for ``vllm serve`` expects: vLLM's sampling extensions, /tokenize and
/detokenize, a stream's headers at admission, and aborted streams logged as aborted. The real
model on a real uvicorn (the official openai client and raw HTTP), the null backend where a
backend's timing or abilities must be set."""
from __future__ import annotations

import contextlib
import json
import logging
import time

import httpx
import openai
import pytest

from gateway.app import create_app

from .conftest import API_KEY, BASE, Server, settings

SAY_HI = [{"role": "user", "content": "Say hi"}]
SHORT = [{"role": "user", "content": "What is 2+2? Answer with a number only."}]  # ends after 8 tokens


@pytest.fixture(scope="module")
def client(embedded_server):
    with openai.OpenAI(base_url=embedded_server.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {API_KEY}"}


def access_records(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "tensafe.access"]


def wait_for_record(caplog, path: str, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for r in access_records(caplog) if r["path"] == path]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, "no access-log record"
        time.sleep(0.02)


# ---- sampling extensions ---------------------------------------------------------------------------
@pytest.mark.slow
def test_ignore_eos_gives_exactly_max_tokens(client, caplog):
    caplog.set_level(logging.INFO, logger="tensafe.access")
    natural = client.chat.completions.create(model=BASE, messages=SAY_HI, max_completion_tokens=64, temperature=0)
    assert natural.choices[0].finish_reason == "stop" and natural.usage.completion_tokens < 64
    forced = client.chat.completions.create(model=BASE, messages=SAY_HI, max_completion_tokens=64, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 64 and forced.choices[0].finish_reason == "length"
    streamed = client.completions.create(model=BASE, prompt="Hi", max_tokens=64, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    assert [c.usage.completion_tokens for c in streamed if c.usage] == [64]
    assert all("ignored_fields" not in r for r in access_records(caplog))


@pytest.mark.slow
def test_min_tokens_top_k_and_repetition_penalty(client):
    natural = client.chat.completions.create(model=BASE, messages=SHORT, max_tokens=64, temperature=0)
    assert natural.usage.completion_tokens < 20
    held = client.chat.completions.create(model=BASE, messages=SHORT, max_tokens=64, temperature=0,
                                          extra_body={"min_tokens": 20})
    assert held.usage.completion_tokens >= 20
    greedy = client.chat.completions.create(model=BASE, messages=SAY_HI, max_tokens=12, temperature=0)
    top1 = client.chat.completions.create(model=BASE, messages=SAY_HI, max_tokens=12, temperature=1.5, seed=1,
                                          extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    penalised = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Repeat the word 'cat' ten times."}], max_tokens=24,
        temperature=0, extra_body={"repetition_penalty": 2.0, "ignore_eos": True})
    plain = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Repeat the word 'cat' ten times."}], max_tokens=24,
        temperature=0, extra_body={"ignore_eos": True})
    assert penalised.choices[0].message.content != plain.choices[0].message.content  # exact: tests/engine


@pytest.mark.slow
def test_stop_token_ids(client, embedded_server):
    text = client.completions.create(model=BASE, prompt="The three primary colours are", max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    ids = httpx.post(embedded_server.url + "/tokenize", json={"model": BASE, "prompt": text,
                                                                 "add_special_tokens": False},
                     headers=auth()).json()["tokens"]
    stop = ids[3]
    cut = client.completions.create(model=BASE, prompt="The three primary colours are", max_tokens=12,
                                    temperature=0, extra_body={"ignore_eos": True, "stop_token_ids": [stop]})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= ids.index(stop) + 1 < 12
    assert len(cut.choices[0].text) < len(text)


@pytest.mark.slow
def test_bad_extension_values_are_400s_naming_the_parameter(client):
    for extra, param in (({"min_tokens": 10}, "min_tokens"), ({"top_k": -2}, "top_k"),
                         ({"repetition_penalty": 0}, "repetition_penalty"), ({"stop_token_ids": ["a"]}, "stop_token_ids"),
                         ({"ignore_eos": "yes"}, "ignore_eos"), ({"stop_token_ids": [10**6]}, "stop_token_ids")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=BASE, messages=SAY_HI, max_tokens=4, extra_body=extra)
        assert exc.value.body["param"] == param, extra


async def test_an_extension_no_backend_honours_is_refused_by_name(tmp_path):
    pool = {"name": "default", "kind": "null", "options": {"extensions": ["ignore_eos"]}}
    app = create_app(settings(tmp_path, pools=json.dumps([pool])))
    body = {"model": BASE, "messages": SAY_HI, "max_tokens": 8}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw", headers=auth()) as c:
            ok = await c.post("/v1/chat/completions", json={**body, "ignore_eos": True})
            refused = await c.post("/v1/chat/completions", json={**body, "min_tokens": 2, "ignore_eos": True})
            neutral = await c.post("/v1/chat/completions", json={**body, "min_tokens": 0, "top_k": -1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "min_tokens"
    assert refused.json()["error"]["code"] == "unsupported_parameter"
    assert neutral.status_code == 200


async def test_fields_vllm_defines_but_we_do_not_honour_stay_ignored_and_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tensafe.access")
    app = create_app(settings(tmp_path))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw", headers=auth()) as c:
            r = await c.post("/v1/chat/completions", json={"model": BASE, "messages": SAY_HI, "min_p": 0.1,
                                                           "ignore_eos": True, "max_tokens": 3})
    assert r.status_code == 200
    (record,) = access_records(caplog)
    assert record["ignored_fields"] == ["min_p"]


# ---- /tokenize and /detokenize ----------------------------------------------------------------------
@pytest.mark.slow
def test_tokenize_and_detokenize_match_the_models_tokenizer(embedded_server, checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    with httpx.Client(base_url=embedded_server.url, headers=auth(), timeout=30) as http:
        r = http.post("/tokenize", json={"model": BASE, "prompt": "Hello, world!", "return_token_strs": True})
        assert r.status_code == 200
        body = r.json()
        assert body["tokens"] == tok.encode("Hello, world!", add_special_tokens=True)
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
        assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
        chat = http.post("/tokenize", json={"model": "support", "messages": SAY_HI}).json()
        expected = tok.apply_chat_template(SAY_HI, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert chat["tokens"] == expected["input_ids"] and chat["token_strs"] is None
        bare = http.post("/tokenize", json={"model": BASE, "messages": SAY_HI, "add_generation_prompt": False})
        assert len(bare.json()["tokens"]) < len(chat["tokens"])
        back = http.post("/detokenize", json={"model": BASE, "tokens": chat["tokens"]})
        assert back.status_code == 200 and back.json() == {"prompt": tok.decode(chat["tokens"])}
        assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
        assert http.post("/tokenize", json={"model": BASE, "prompt": "x"}, headers={"authorization": ""}
                         ).status_code == 401
        outside = http.post("/detokenize", json={"model": BASE, "tokens": [10**6]})
        assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens"
        both = http.post("/tokenize", json={"model": BASE, "prompt": "x", "messages": SAY_HI})
        assert both.status_code == 400
        template = http.post("/tokenize", json={"model": BASE, "messages": SAY_HI, "chat_template": "{{ x }}"})
        assert template.status_code == 400 and template.json()["error"]["param"] == "chat_template"


async def test_tokenize_on_backends_without_a_tokenizer_is_a_501(tmp_path):
    app = create_app(settings(tmp_path))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw", headers=auth()) as c:
            r = await c.post("/tokenize", json={"model": BASE, "prompt": "Hello"})
    assert r.status_code == 501 and r.json()["error"]["code"] == "not_implemented"


# ---- streams: headers at admission, errors as events, aborts logged --------------------------------
@contextlib.contextmanager
def slow_start(tmp_path, **overrides):
    """The gateway on a null backend whose first token comes 1.5 s after acceptance."""
    pool = {"name": "default", "kind": "null", "options": {"first_token_delay_s": 1.5}}
    with Server(create_app(settings(tmp_path, pools=json.dumps([pool]), **overrides))) as server:
        yield server


def test_stream_headers_arrive_before_the_first_token(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tensafe.access")
    body = {"model": BASE, "messages": SAY_HI, "max_tokens": 4, "stream": True}
    with slow_start(tmp_path) as server, httpx.Client(base_url=server.url, headers=auth(), timeout=30) as http:
        t0 = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            headers_at = time.monotonic() - t0
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            first_at = time.monotonic() - t0
            rest = [line for line in lines if line]
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert rest[-1] == "data: [DONE]"
        assert headers_at < 1.0 and first_at >= 1.5, (headers_at, first_at)
        record = wait_for_record(caplog, "/v1/chat/completions")
        assert record["status"] == 200 and record["ttft_ms"] >= 1500  # TTFT is to the first token


def test_a_failure_after_the_headers_is_an_error_event(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tensafe.access")
    body = {"model": BASE, "messages": SAY_HI, "max_tokens": 4, "stream": True}
    with slow_start(tmp_path, request_timeout_s=0.5) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as sdk:
            with pytest.raises(openai.APIError) as exc:
                list(sdk.chat.completions.create(**{k: v for k, v in body.items() if k != "stream"}, stream=True))
        assert "timed out" in str(exc.value.message)
        record = wait_for_record(caplog, "/v1/chat/completions")
        assert record["status"] == 504 and record["error_code"] == "timeout"


@pytest.mark.slow
def test_a_stream_closed_after_three_chunks_is_logged_as_a_499(embedded_server, caplog):
    caplog.set_level(logging.INFO, logger="tensafe.access")
    body = {"model": BASE, "messages": SAY_HI, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=embedded_server.url, headers=auth(), timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                if len(events) == 3:
                    break
    record = wait_for_record(caplog, "/v1/chat/completions")
    assert record["status"] == 499 and record["error_code"] == "client_disconnected"
    assert 3 <= record["completion_tokens"] < 200 and "finish_reason" not in record
    metrics = embedded_server.gateway.metrics.render().decode()
    assert any(line.startswith("tensafe_requests_total{") and 'status="499"' in line
               and 'code="client_disconnected"' in line for line in metrics.splitlines())
