"""The official openai client against a real uvicorn on 127.0.0.1 serving the real model."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from .conftest import API_KEY, BASE, validate

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def sync_client(embedded_server):
    with openai.OpenAI(base_url=embedded_server.url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def test_chat_non_streaming_answers_paris(sync_client):
    r = sync_client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=12, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    validate(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")


def test_chat_streaming_matches_non_streaming(sync_client):
    kwargs = dict(model=BASE, messages=QUESTION, max_completion_tokens=10, temperature=0)
    reply = sync_client.chat.completions.create(**kwargs)
    whole = reply.choices[0].message.content
    stream = sync_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage == reply.usage


def test_completions_both_ways(sync_client):
    r = sync_client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 5
    text = "".join(c.choices[0].text for c in sync_client.completions.create(
        model=BASE, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True))
    assert text == r.choices[0].text


def test_seed_reproduces_sampling(sync_client):
    kwargs = dict(model=BASE, messages=QUESTION, max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = sync_client.chat.completions.create(**kwargs).choices[0].message.content
    b = sync_client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_errors_surface_as_openai_exceptions(sync_client):
    with pytest.raises(openai.NotFoundError) as exc:
        sync_client.chat.completions.create(model="nope", messages=QUESTION)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        sync_client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=5000)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="tools"):
        sync_client.chat.completions.create(model=BASE, messages=QUESTION, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    bad = openai.OpenAI(base_url=sync_client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_models_lists_adapters_and_adapter_serves(sync_client, embedded_server):
    ids = [m.id for m in sync_client.models.list().data]
    assert ids == [BASE, "support", "legal"]
    raw = sync_client.chat.completions.with_raw_response.create(model="support", messages=QUESTION, max_tokens=6,
                                                                temperature=0)
    assert raw.headers["x-tensafe-adapter"] == "support"
    adapted = raw.parse().choices[0].message.content
    base = sync_client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=6, temperature=0)
    assert adapted != base.choices[0].message.content  # the adapter changes the output
    assert "x-tensafe-adapter" not in sync_client.chat.completions.with_raw_response.create(
        model=BASE, messages=QUESTION, max_tokens=1).headers


async def test_async_client_32_concurrent_streams(embedded_server):
    engine = embedded_server.gateway.backend.engine
    async with openai.AsyncOpenAI(base_url=embedded_server.url + "/v1", api_key=API_KEY, max_retries=0) as client:
        async def one(i: int):
            messages = [{"role": "user", "content": f"Count to {i}."}]
            stream = await client.chat.completions.create(
                model=[BASE, "support", "legal"][i % 3], messages=messages, max_tokens=8 + i % 5, temperature=0,
                stream=True, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            return i, messages, chunks

        results = await asyncio.gather(*(one(i) for i in range(32)))
    from engine import ChatMessage, GenerationRequest

    for i, messages, chunks in results:
        usage = chunks[-1].usage
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish in (["stop"], ["length"])
        if finish == ["length"]:
            assert usage.completion_tokens == 8 + i % 5
        else:
            assert 1 <= usage.completion_tokens <= 8 + i % 5
        expected = engine.count_tokens(GenerationRequest("count", messages=[ChatMessage("user", messages[0]["content"])]))
        assert usage.prompt_tokens == expected
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_async_client_non_streaming_completion(embedded_server):
    async with openai.AsyncOpenAI(base_url=embedded_server.url + "/v1", api_key=API_KEY, max_retries=0) as client:
        r = await client.completions.create(model="legal", prompt="Hello", max_tokens=3)
        assert r.usage.completion_tokens == 3 and r.model == "legal"


def test_disconnect_mid_stream_frees_the_slot(embedded_server):
    backend = embedded_server.gateway.backend
    total = backend.capacity().max_sequence_slots
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 400, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=embedded_server.url, headers={"authorization": f"Bearer {API_KEY}"}) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert backend.capacity().free_sequence_slots == total - 1
        # the connection is closed here, long before 400 tokens
    deadline = time.monotonic() + 2.0
    while backend.capacity().free_sequence_slots != total and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.capacity().free_sequence_slots == total
    assert backend.capacity().queue_depth == 0
