"""model "auto" through the app: the tenant's expert table picks the adapter."""
from __future__ import annotations

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
