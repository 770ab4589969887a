"""model "auto" through the app: the tenant's expert table picks the adapter; keyword patterns
are tenant input, matched by RE2, and a stored table is read back leniently."""
from __future__ import annotations

import asyncio
import logging

import torch

from gateway.app import create_app

from .conftest import BASE, asgi_client, settings
from .test_tenancy import CHAT, world  # noqa: F401 - the fixture

TABLE = {
    "default": "general",
    "experts": [
        {"name": "code", "adapter": "code-bot", "description": "Programming, debugging and software.",
         "keywords": [{"pattern": "python", "weight": 2.0}, {"pattern": "function", "weight": 1.5},
                      {"pattern": "stack trace", "weight": 3.0}],
         "examples": ["Write a Python function that reverses a list", "Why does my code throw a KeyError?"]},
        {"name": "math", "adapter": "math-bot", "description": "Arithmetic, algebra and calculus.",
         "keywords": [{"pattern": "integral", "weight": 3.0}, {"pattern": "solve", "weight": 1.5}],
         "examples": ["Solve 3x + 5 = 20", "What is the derivative of x^2 sin x?"]},
        {"name": "general", "adapter": "smollm2-135m-instruct", "description": "Everything else.",
         "keywords": [], "examples": ["What is the capital of France?", "Give me tips for sleeping better"]},
    ],
}


async def test_auto_routes_to_the_experts_adapter(world):  # noqa: F811
    for name, seed in (("code-bot", 21), ("math-bot", 22)):
        assert (await world.upload("a", world.package("a", name, seed=seed))).status_code == 201
    r = await world.client.put("/v1/experts", json=TABLE, headers=world.h("a"))
    assert r.status_code == 200, r.text
    assert (await world.client.get("/v1/experts", headers=world.h("a"))).json()["default"] == "general"
    r = await world.client.post(CHAT, json={"model": "auto", "max_tokens": 2, "messages": [
        {"role": "user", "content": "My python function crashes with a stack trace, help"}]}, headers=world.h("a"))
    assert r.status_code == 200, r.text
    assert r.headers["x-tensafe-adapter"] == "code-bot" and r.headers["x-tensafe-expert"] == "code"
    assert r.json()["model"] == "code-bot"
    r = await world.client.post("/v1/route", json={"prompt": "compute the integral of x squared from 0 to 3"},
                                headers=world.h("a"))
    decision = r.json()
    assert decision["expert"] == "math" and decision["adapter"] == "math-bot"
    assert decision["method"] in ("keyword", "neural") and set(decision["scores"]) >= {"code", "math"}
    assert decision["reason"]
    r = await world.client.post("/v1/completions", json={"model": "auto", "prompt": "solve 2x = 10", "max_tokens": 1},
                                headers=world.h("a"))
    assert r.headers["x-tensafe-adapter"] == "math-bot"


async def test_helper_threads_beside_the_engine_run_torch_single_threaded(tmp_path):
    # the encoder's thread and the loop's executor threads: a team of their own would make the
    # step thread's parallel ops sleep and wake (engine.threads); beside the null backend
    # nothing is confined
    threads = {}
    for backend in ("null", "embedded"):
        app = create_app(settings(tmp_path / backend, backend=backend, max_num_seqs=2, max_model_len=128))
        async with asgi_client(app):
            router = await app.state.gateway.auto.router()
            loop = asyncio.get_running_loop()
            threads[backend] = (await loop.run_in_executor(router.encoder._executor, torch.get_num_threads),
                                await asyncio.to_thread(torch.get_num_threads))
    assert threads == {"embedded": (1, 1), "null": (torch.get_num_threads(),) * 2}
    assert torch.get_num_threads() > 1  # or the test proves nothing


async def test_expert_tables_are_per_tenant_and_validated(world):  # noqa: F811
    bad = {**TABLE, "experts": [{**TABLE["experts"][0], "adapter": "b-bot"}], "default": None}
    r = await world.client.put("/v1/experts", json=bad, headers=world.h("a"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_not_found"
    r = await world.client.put("/v1/experts", json={"experts": [{"name": ""}]}, headers=world.h("a"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"
    r = await world.client.post(CHAT, json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
                                headers=world.h("b"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_expert_table"
    table = {"default": None, "experts": [{"name": "bot", "adapter": "a-bot", "keywords": [{"pattern": "zzz"}]}]}
    assert (await world.client.put("/v1/experts", json=table, headers=world.h("a"))).status_code == 200
    assert (await world.client.get("/v1/experts", headers=world.h("b"))).status_code == 404


def one_expert(*keywords: dict) -> dict:
    return {"default": None, "experts": [{"name": "code", "adapter": BASE, "keywords": list(keywords)}]}


async def test_regex_keywords_run_on_re2(world):  # noqa: F811
    bad = one_expert({"pattern": "python"}, {"pattern": r"(a)\1", "regex": True})
    r = await world.client.put("/v1/experts", json=bad, headers=world.h("a"))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    assert "experts[0].keywords[1].pattern" in error["message"] and repr(r"(a)\1") in error["message"]
    assert "RE2" in error["message"]
    crafted = one_expert({"pattern": "(a+)+$", "regex": True}, {"pattern": "(a|aa)+!", "regex": True, "weight": 3})
    r = await world.client.put("/v1/experts", json=crafted, headers=world.h("a"))
    assert r.status_code == 200, r.text
    r = await world.client.post("/v1/route", json={"prompt": "a" * 5000 + "!"}, headers=world.h("a"))
    assert r.status_code == 200, r.text
    decision = r.json()
    assert decision["expert"] == "code" and decision["method"] == "keyword"
    assert "'(a|aa)+!' (3)" in decision["reason"] and "(a+)+$" not in decision["reason"]


async def test_a_weight_beyond_a_float_is_a_400(world):  # noqa: F811
    body = ('{"experts": [{"name": "code", "adapter": "%s", "keywords": [{"pattern": "x", "weight": 1%s}]}]}'
            % (BASE, "0" * 400))
    r = await world.client.put("/v1/experts", content=body,
                               headers={**world.h("a"), "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_value"
    assert "experts[0].keywords[0].weight" in r.json()["error"]["message"]


async def test_a_stored_table_is_served_without_keywords_that_no_longer_compile(world, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="tensafe.gateway")
    pattern = r"(?<=x)y" + "z" * 100  # written by an older version, which ran Python's re
    stored = one_expert({"pattern": "python", "weight": 2.0}, {"pattern": pattern, "regex": True})
    await world.gateway.store.put_experts("a", stored)
    r = await world.client.get("/v1/experts", headers=world.h("a"))
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["experts"][0]["keywords"] == [{"pattern": "python", "weight": 2.0, "regex": False}]
    [skipped] = view["skipped_keywords"]
    assert skipped["expert"] == "code" and skipped["pattern"] == pattern
    assert "is not supported" in skipped["reason"]
    secret = "my python question nobody else may read"
    r = await world.client.post(CHAT, json={"model": "auto", "max_tokens": 2, "messages": [
        {"role": "user", "content": secret}]}, headers=world.h("a"))
    assert r.status_code == 200, r.text
    assert r.headers["x-tensafe-expert"] == "code"
    [line] = [rec.getMessage() for rec in caplog.records if "skipped keyword" in rec.getMessage()]
    assert "tenant a" in line and "'code'" in line and repr(pattern[:64]) in line
    assert pattern not in caplog.text and secret not in caplog.text
    await world.client.get("/v1/experts", headers=world.h("a"))
    assert sum("skipped keyword" in rec.getMessage() for rec in caplog.records) == 1  # once per stored version
    r = await world.client.put("/v1/experts", json=one_expert({"pattern": "python"}), headers=world.h("a"))
    assert "skipped_keywords" not in r.json()
    assert "skipped_keywords" not in (await world.client.get("/v1/experts", headers=world.h("a"))).json()


async def test_a_stored_table_broken_beyond_keywords_asks_for_a_new_one(world):  # noqa: F811
    await world.gateway.store.put_experts("a", {"experts": [{"name": "code", "adapter": BASE}], "default": "gone"})
    r = await world.client.post(CHAT, json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
                                headers=world.h("a"))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_expert_table" and "PUT /v1/experts" in error["message"]
    r = await world.client.post("/v1/route", json={"prompt": "hi"}, headers=world.h("a"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_expert_table"
    r = await world.client.get("/v1/experts", headers=world.h("a"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_expert_table"
    r = await world.client.put("/v1/experts", json=one_expert({"pattern": "python"}), headers=world.h("a"))
    assert r.status_code == 200, r.text
    r = await world.client.post("/v1/route", json={"prompt": "python"}, headers=world.h("a"))
    assert r.status_code == 200 and r.json()["expert"] == "code"
