"""Inputs that once produced a 500 each get a 400 in OpenAI's shape naming the parameter:
deep nesting, integers out of range, lone surrogates, numbers beyond a float, and names that
cannot stand in a header as they are."""
from __future__ import annotations

import json
import urllib.parse

import pytest

from gateway.api.jsonresponse import JSONResponse

from .conftest import BASE, validate
from .test_tenancy import CHAT, HELLO, world  # noqa: F401 - the fixture

DEEP = "[" * 1000 + "]" * 1000


def error_of(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    validate(body, "ErrorResponse")
    return body["error"]


async def post_raw(world, path: str, text: str, who: str = "a", method: str = "POST"):  # noqa: F811
    return await world.client.request(method, path, content=text.encode(), headers={
        **world.h(who), "content-type": "application/json"})


@pytest.mark.parametrize("path,method,who", [
    (CHAT, "POST", "a"), ("/v1/completions", "POST", "a"), ("/v1/experts", "PUT", "a"),
    ("/v1/route", "POST", "a"), ("/v1/keys", "POST", "a"), ("/admin/tenants", "POST", "admin"),
    ("/admin/tenants/a", "PATCH", "admin")])
async def test_deeply_nested_json_is_a_400(world, path, method, who):  # noqa: F811
    for text in (DEEP, '{"model": ' + DEEP + "}", '{"x": ' + '{"y": ' * 40 + "1" + "}" * 41):
        error = error_of(await post_raw(world, path, text, who, method))
        assert error["code"] == "invalid_json" and "nested" in error["message"]


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**30])
async def test_seed_outside_signed_64_bits_is_a_400(world, seed):  # noqa: F811
    for path, field in ((CHAT, {"messages": HELLO}), ("/v1/completions", {"prompt": "hi"})):
        r = await world.client.post(path, json={"model": BASE, "seed": seed, **field}, headers=world.h("a"))
        error = error_of(r)
        assert error["param"] == "seed" and error["code"] == "invalid_value"


async def test_seed_at_the_edges_of_signed_64_bits_is_accepted(world):  # noqa: F811
    for seed in (2**63 - 1, -2**63):
        r = await world.client.post(CHAT, json={"model": BASE, "seed": seed, "messages": HELLO}, headers=world.h("a"))
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("text,param", [
    ('{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % BASE, "messages[0].content"),
    ('{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfff"}]}]}' % BASE,
     "messages[0].content[0].text"),
    ('{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ('{"model": "%s", "messages": [{"role": "\\ud800", "content": "hi"}]}' % BASE, "messages[0].role"),
])
async def test_lone_surrogates_in_chat_are_a_400_naming_the_parameter(world, text, param):  # noqa: F811
    error = error_of(await post_raw(world, CHAT, text))
    assert error["param"] == param and error["code"] == "invalid_unicode"


async def test_lone_surrogates_elsewhere_are_a_400(world):  # noqa: F811
    cases = [
        ("/v1/completions", "POST", "a", '{"model": "%s", "prompt": "x\\ud800"}' % BASE, "prompt"),
        ("/v1/keys", "POST", "a", '{"name": "\\udc00"}', "name"),
        ("/admin/tenants", "POST", "admin", '{"id": "zz", "name": "\\ud800"}', "name"),
        ("/v1/experts", "PUT", "a", '{"experts": [{"name": "\\ud800", "adapter": "a-bot"}]}', "experts[0].name"),
    ]
    for path, method, who, text, param in cases:
        error = error_of(await post_raw(world, path, text, who, method))
        assert error["param"] == param and error["code"] == "invalid_unicode", (path, error)
    # a properly paired surrogate escape is an ordinary character
    r = await post_raw(world, CHAT, '{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
                       % BASE)
    assert r.status_code == 200, r.text


async def test_numbers_beyond_a_float_are_a_400(world):  # noqa: F811
    huge = "1" + "0" * 400
    for field in ("temperature", "top_p"):
        text = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (BASE, field, huge)
        error = error_of(await post_raw(world, CHAT, text))
        assert error["param"] == field and error["code"] == "invalid_value"
    for literal in ("1e400", "-1e400", "NaN", "Infinity"):
        text = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % (BASE, literal)
        assert error_of(await post_raw(world, CHAT, text))["code"] == "invalid_json"
    text = '{"quotas": {"requests_per_min": %s}}' % huge
    error = error_of(await post_raw(world, "/admin/tenants/a", text, "admin", "PATCH"))
    assert error["param"] == "quotas"


async def test_audit_after_beyond_64_bits_is_a_400(world):  # noqa: F811
    for after in (str(2**63), str(10**30), "-1"):
        r = await world.client.get("/admin/audit", params={"after": after}, headers=world.h("admin"))
        assert error_of(r)["param"] == "after"
    r = await world.client.get("/admin/audit", params={"after": str(2**63 - 1)}, headers=world.h("admin"))
    assert r.status_code == 200 and r.json()["data"] == []


@pytest.mark.parametrize("name", ["法律-expert", "line\r\nbreak", "nul\x00name", "50% off", "tab\tand\x7fdel"])
async def test_auto_with_any_expert_name_answers_and_the_header_decodes_to_it(world, name):  # noqa: F811
    table = {"default": name, "experts": [{"name": name, "adapter": "a-bot", "keywords": ["invoice"]}]}
    r = await world.client.put("/v1/experts", json=table, headers=world.h("a"))
    assert r.status_code == 200, r.text
    for stream in (False, True):
        r = await world.client.post(CHAT, json={"model": "auto", "stream": stream, "messages": [
            {"role": "user", "content": "my invoice is wrong"}]}, headers=world.h("a"))
        assert r.status_code == 200, r.text
        header = r.headers["x-tensafe-expert"]
        assert header.isascii() and header.isprintable()
        assert urllib.parse.unquote(header) == name
        assert r.headers["x-tensafe-adapter"] == "a-bot"
    decision = (await world.client.post("/v1/route", json={"prompt": "my invoice"}, headers=world.h("a"))).json()
    assert decision["expert"] == name


def test_a_lone_surrogate_in_a_reply_is_rendered_as_valid_json():
    """A name that reached a reply by another road than a request body (a record written by
    an older version, say) is escaped rather than failing the reply."""
    response = JSONResponse({"name": "bad\ud800name", "ok": "é"})
    assert response.status_code == 200
    assert json.loads(response.body) == {"name": "bad\ud800name", "ok": "é"}
    assert JSONResponse({"ok": "é"}).body == '{"ok":"é"}'.encode()  # the fast path is unchanged


async def test_quotas_stored_beyond_the_range_do_not_fail_requests(world):  # noqa: F811
    store = world.gateway.store
    tenant = await store.get_tenant("b")
    await store.update_tenant(type(tenant)(tenant.id, tenant.name, tenant.created, tenant.suspended,
                                           {"requests_per_min": 10**400, "bogus": 1}))
    world.gateway.auth.forget()
    r = await world.client.post(CHAT, json={"model": BASE, "messages": HELLO}, headers=world.h("b"))
    assert r.status_code == 200, r.text
