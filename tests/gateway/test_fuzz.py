"""Property tests: no request, however malformed, gets a 5xx or a non-OpenAI error shape.

One test sweeps the two completion endpoints with bodies near the valid ones; the other takes
every route the app has (so a new endpoint is covered the day it is added), with generated
path parameters, query parameters, bodies (JSON of any shape, deep nesting, huge integers, lone
surrogates, raw bytes) and credentials of every kind."""
from __future__ import annotations

import asyncio
import json
import re
import urllib.parse

import httpx
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from starlette.routing import Route

from gateway.app import create_app

from .conftest import BASE, asgi_client, settings, validate

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)

FIELDS = ["model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens",
          "temperature", "top_p", "seed", "stop", "n", "user", "logprobs", "tools", "response_format", "echo"]
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]) | json_values,
                                 "content": st.text(max_size=30) | json_values})
valid_ish = st.fixed_dictionaries(
    {"model": st.sampled_from([BASE, "nope"]) | json_values,
     "messages": st.lists(message, max_size=3) | json_values},
    optional={name: json_values for name in FIELDS[2:]} | {
        "max_tokens": st.integers(-5, 3000), "stream": st.booleans(), "prompt": st.text(max_size=20)})
bodies = st.one_of(valid_ish, json_values, st.dictionaries(st.sampled_from(FIELDS), json_values))


def test_no_body_gets_a_5xx(tmp_path):
    app = create_app(settings(tmp_path, max_model_len=256, null_tokens=3))

    async def run_all(examples: list) -> None:
        async with asgi_client(app) as client:
            for path, body in examples:
                r = await client.post(path, content=json.dumps(body))
                assert r.status_code < 500, (body, r.text)
                if r.status_code >= 400:
                    validate(r.json(), "ErrorResponse")

    examples: list = []

    @hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), bodies)
    def gather(path, body):
        examples.append((path, body))

    gather()
    asyncio.run(run_all(examples))
    assert len(examples) >= 400


# -- every endpoint -----------------------------------------------------------------------------
ADMIN = "tsk-fuzz-admin"
any_text = st.text(st.characters(exclude_categories=()), max_size=24)  # lone surrogates included
huge_ints = st.sampled_from([2**63, -2**63 - 1, 2**64, 10**30, 10**400, -(10**400)])
wild_scalars = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints, st.floats(allow_nan=False), any_text,
                         st.sampled_from(["a-bot", BASE, "auto", "t1", "tenant", "tenant-admin", "admin"]))
wild_json = st.recursive(wild_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=5)), max_leaves=16)
BODY_FIELDS = ["model", "messages", "prompt", "id", "name", "quotas", "scopes", "suspended", "experts", "default",
               "keywords", "examples", "ed25519_pem", "mldsa_pem", "seed", "temperature", "max_tokens", "stream"]
wild_objects = st.dictionaries(st.sampled_from(BODY_FIELDS) | any_text, wild_json, max_size=6)


def _text_body(value) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes


deep = st.integers(33, 3000).map(lambda n: ("[" * n + "]" * n).encode())
wild_bodies = st.one_of(wild_objects.map(_text_body), wild_json.map(_text_body), deep, st.binary(max_size=64),
                        st.just(b""), st.sampled_from([b"NaN", b'{"a": Infinity}', b'{"temperature": 1e400}']))
QUERY_NAMES = ["limit", "after", "since", "tenant", "model"]
wild_queries = st.dictionaries(st.sampled_from(QUERY_NAMES) | any_text,
                               any_text | huge_ints.map(str) | st.integers().map(str), max_size=3)
CREDENTIALS = ["admin", "tenant", "none", "garbage"]


def _path_value(text: str) -> str:
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="") or "x"


def _fill(template: str, values: list[str]) -> str:
    names = re.findall(r"{(\w+)(?::\w+)?}", template)
    path = template
    for name, value in zip(names, values):
        path = re.sub(r"{%s(?::\w+)?}" % name, _path_value(value), path)
    return path


def _routes(app) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        if isinstance(route, Route):
            out += [(method, route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return out


def test_no_request_to_any_endpoint_gets_a_5xx(tmp_path):
    app = create_app(settings(tmp_path, admin_key=ADMIN, api_key=None, max_model_len=256, null_tokens=3))
    routes = _routes(app)
    assert len(routes) >= 40  # every route of the app, not a hand-kept list
    examples: list = []

    @hsettings(max_examples=20 * len(routes), deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(any_text | st.sampled_from(["t1", "a-bot", "pin", BASE]), min_size=3, max_size=3),
           wild_queries, wild_bodies, st.sampled_from(CREDENTIALS))
    def gather(path_values, query, body, credential):
        route = routes[len(examples) % len(routes)]  # every route gets its share of the examples
        examples.append((route, path_values, query, body, credential))

    gather()

    async def run_all() -> dict[str, int]:
        seen: dict[str, int] = {}
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
                admin = {"authorization": f"Bearer {ADMIN}"}
                r = await client.post("/admin/tenants", json={"id": "t1"}, headers=admin)
                assert r.status_code == 201
                r = await client.post("/admin/tenants/t1/keys", json={"scopes": ["tenant", "tenant-admin"]},
                                      headers=admin)
                tenant_key = r.json()["key"]
                keys = {"admin": ADMIN, "tenant": tenant_key, "garbage": "tsk-not-a-key"}
                for (method, template), path_values, query, body, credential in examples:
                    headers = {"content-type": "application/json"}
                    if credential in keys:
                        headers["authorization"] = f"Bearer {keys[credential]}"
                    path = _fill(template, path_values)
                    query_string = urllib.parse.urlencode(
                        {k.encode("utf-8", "surrogatepass"): v.encode("utf-8", "surrogatepass")
                         for k, v in query.items()})
                    r = await client.request(method, path + ("?" + query_string if query_string else ""),
                                             content=body if method in ("POST", "PUT", "PATCH") else None,
                                             headers=headers)
                    assert r.status_code < 500, (method, path, query, body[:200], r.text)
                    if r.status_code >= 400:
                        validate(r.json(), "ErrorResponse")
                    seen[f"{method} {template}"] = seen.get(f"{method} {template}", 0) + 1
        return seen

    seen = asyncio.run(run_all())
    assert len(seen) == len(routes), sorted(set(f"{m} {p}" for m, p in routes) - set(seen))
