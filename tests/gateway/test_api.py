"""The HTTP API on the null backend, in-process: shapes, statuses and headers."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from gateway.app import create_app

from .conftest import API_KEY, BASE, asgi_client, settings, validate

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hello there"}]


def sse_payloads(text: str) -> list:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


MALFORMED = [
    # (body, status, param, code)
    ({"messages": USER}, 400, "model", "missing_required_parameter"),
    ({"model": 3, "messages": USER}, 400, "model", "invalid_type"),
    ({"model": BASE}, 400, "messages", "missing_required_parameter"),
    ({"model": BASE, "messages": []}, 400, "messages", "empty_array"),
    ({"model": BASE, "messages": "hi"}, 400, "messages", "invalid_type"),
    ({"model": BASE, "messages": ["hi"]}, 400, "messages[0]", "invalid_type"),
    ({"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ({"model": BASE, "messages": [{"content": "x"}]}, 400, "messages[0].role", "missing_required_parameter"),
    ({"model": BASE, "messages": [{"role": "user"}]}, 400, "messages[0].content", "missing_required_parameter"),
    ({"model": BASE, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
    ({"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0].type", "unsupported_parameter"),
    ({"model": BASE, "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, 400,
     "messages[0].role", "invalid_value"),
    ({"model": BASE, "messages": USER, "max_tokens": "9"}, 400, "max_tokens", "invalid_type"),
    ({"model": BASE, "messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": BASE, "messages": USER, "max_completion_tokens": True}, 400, "max_completion_tokens", "invalid_type"),
    ({"model": BASE, "messages": USER, "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"model": BASE, "messages": USER, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"model": BASE, "messages": USER, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": BASE, "messages": USER, "seed": 1.5}, 400, "seed", "invalid_type"),
    ({"model": BASE, "messages": USER, "stop": 7}, 400, "stop", "invalid_type"),
    ({"model": BASE, "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"model": BASE, "messages": USER, "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"model": BASE, "messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options",
     "invalid_value"),
    ({"model": BASE, "messages": USER, "n": 2}, 400, "n", "unsupported_parameter"),
    ({"model": BASE, "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported_parameter"),
    ({"model": BASE, "messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ({"model": BASE, "messages": USER, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({"model": BASE, "messages": USER, "user": 12}, 400, "user", "invalid_type"),
    ({"model": "no-such-model", "messages": USER}, 404, "model", "model_not_found"),
    ([1, 2], 400, None, "invalid_type"),
]


@pytest.mark.parametrize("body,status,param,code", MALFORMED)
async def test_malformed_chat_request_gets_its_error(client, body, status, param, code):
    r = await client.post(CHAT, json=body)
    assert r.status_code == status, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize("body,param,code", [
    ({"model": BASE}, "prompt", "missing_required_parameter"),
    ({"model": BASE, "prompt": ""}, "prompt", "invalid_value"),
    ({"model": BASE, "prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    ({"model": BASE, "prompt": {"text": "a"}}, "prompt", "invalid_type"),
    ({"model": BASE, "prompt": "a", "echo": True}, "echo", "unsupported_parameter"),
    ({"model": BASE, "prompt": "a", "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"model": BASE, "prompt": "a", "suffix": "z"}, "suffix", "unsupported_parameter"),
])
async def test_malformed_completion_request_gets_its_error(client, body, param, code):
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    validate(r.json(), "ErrorResponse")
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)


async def test_body_that_is_not_json_is_400(client):
    r = await client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    r = await client.post(CHAT, content=b"\xff\xfe\x00")
    assert r.status_code == 400


async def test_body_too_large_is_413(tmp_path):
    async with asgi_client(create_app(settings(tmp_path, max_body_bytes=1000))) as c:
        r = await c.post(CHAT, json={"model": BASE, "messages": [{"role": "user", "content": "x" * 2000}]})
        assert r.status_code == 413
        validate(r.json(), "ErrorResponse")
        assert r.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_path_and_wrong_method_are_openai_shaped(client):
    r = await client.get("/v1/nothing-here")
    assert r.status_code == 404
    validate(r.json(), "ErrorResponse")
    r = await client.get(CHAT)
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]


async def test_v1_requires_the_api_key(client):
    for headers in ({"authorization": ""}, {"authorization": "Bearer wrong"}, {"authorization": "Basic abc"}):
        r = await client.get("/v1/models", headers=headers)
        assert r.status_code == 401
        validate(r.json(), "ErrorResponse")
        assert r.json()["error"]["type"] == "authentication_error"
        assert API_KEY not in r.text
    assert (await client.get("/health", headers={"authorization": ""})).status_code == 200


async def test_health_and_ready(client):
    assert (await client.get("/health")).json() == {"status": "ok", "stores": {"registry": "ok"}}
    r = await client.get("/ready")
    assert r.status_code == 200 and r.json()["model"] == BASE


async def test_non_streaming_chat_validates_and_counts(client):
    r = await client.post(CHAT, json={"model": BASE, "messages": USER, "max_tokens": 5})
    assert r.status_code == 200
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["content"] == "tok tok tok tok tok"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5
    assert body["id"].startswith("chatcmpl-") and body["model"] == BASE


async def test_stop_string_ends_with_stop(client):
    r = await client.post(CHAT, json={"model": BASE, "messages": USER, "max_tokens": 10, "stop": ["tok tok tok"]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "tok tok tok" not in choice["message"]["content"]


async def test_streaming_chat_with_usage(client):
    r = await client.post(CHAT, json={"model": BASE, "messages": USER, "max_tokens": 4, "stream": True,
                                      "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(r.text)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "tok tok tok tok"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks}) == 1


async def test_streaming_completion_without_usage(client):
    r = await client.post("/v1/completions", json={"model": BASE, "prompt": "Once", "max_tokens": 3, "stream": True})
    chunks = sse_payloads(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "tok tok tok"
    assert all("usage" not in c for c in chunks)
    validate(chunks[-1], "CreateCompletionResponse")


async def test_completion_accepts_token_ids(client):
    r = await client.post("/v1/completions", json={"model": BASE, "prompt": [1, 2, 3], "max_tokens": 2})
    body = r.json()
    validate(body, "CreateCompletionResponse")
    assert body["usage"]["prompt_tokens"] == 3


async def test_models_list_and_get(client):
    r = await client.get("/v1/models")
    validate(r.json(), "ListModelsResponse")
    assert [m["id"] for m in r.json()["data"]] == [BASE]
    r = await client.get(f"/v1/models/{BASE}")
    validate(r.json(), "Model")
    r = await client.get("/v1/models/org/unknown")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_request_id_is_echoed_or_generated(client):
    r = await client.post(CHAT, json={"model": BASE, "messages": USER}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.get("/health", headers={"x-request-id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and len(r.headers["x-request-id"]) == 32


async def test_context_overflow_is_400(tmp_path):
    async with asgi_client(create_app(settings(tmp_path, max_model_len=64))) as c:
        r = await c.post(CHAT, json={"model": BASE, "messages": USER, "max_tokens": 100})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_full_queue_is_503_with_retry_after(tmp_path):
    app = create_app(settings(tmp_path, max_num_seqs=1, max_queue=0, null_token_delay_s=0.05, retry_after_s=2))
    async with asgi_client(app) as c:
        body = {"model": BASE, "messages": USER, "max_tokens": 10}
        first = asyncio.create_task(c.post(CHAT, json=body))
        await asyncio.sleep(0.1)
        r = await c.post(CHAT, json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        validate(r.json(), "ErrorResponse")
        assert r.json()["error"]["code"] == "overloaded"
        assert (await first).status_code == 200


async def test_timeout_ends_runaway_requests(tmp_path):
    app = create_app(settings(tmp_path, null_token_delay_s=0.05, request_timeout_s=0.3))
    async with asgi_client(app) as c:
        body = {"model": BASE, "messages": USER, "max_tokens": 200}
        r = await c.post(CHAT, json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        r = await c.post(CHAT, json={**body, "stream": True})
        assert r.status_code == 200
        events = [e for e in r.text.split("\n\n") if e]
        assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "timeout"
        assert app.state.gateway.backend.capacity().free_sequence_slots == 32


async def test_access_log_has_ids_and_counts_but_no_content(client, caplog):
    caplog.set_level(logging.INFO, logger="tensafe.access")
    secret_prompt = "my secret prompt 4242"
    await client.post(CHAT, json={"model": BASE, "messages": [{"role": "user", "content": secret_prompt}],
                                  "max_tokens": 3, "mystery_field": 1}, headers={"x-request-id": "log-1"})
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tensafe.access"]
    record = next(r for r in records if r["request_id"] == "log-1")
    assert record["status"] == 200 and record["model"] == BASE and record["completion_tokens"] == 3
    assert record["tenant"] == "default" and record["ignored_fields"] == ["mystery_field"]
    assert "ttft_ms" in record and record["latency_ms"] >= record["ttft_ms"]
    assert secret_prompt not in caplog.text and "tok tok" not in caplog.text and API_KEY not in caplog.text


async def test_unknown_fields_are_ignored(client):
    r = await client.post(CHAT, json={"model": BASE, "messages": USER, "top_k": 3, "x_custom": {"a": 1},
                                      "metadata": {"k": "v"}, "n": 1, "presence_penalty": 0})
    assert r.status_code == 200
