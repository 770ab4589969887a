"""Operator tooling against real stores and servers: recipient key rotation, audit
verification, the admin CLI, and OIDC bearer tokens through the app."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from adapters.keys import current_recipient_from_document
from gateway.app import create_app
from gateway.cli import main

from .conftest import BASE, Server, settings
from .test_tenancy import ADMIN, CHAT, HELLO, World, running


async def test_rotated_recipient_keys_keep_old_packages_readable(tmp_path, capsys):
    async with running(tmp_path) as (app, client):
        w = World(client, app, tmp_path)
        first = (await client.get("/v1/tssp/recipient")).json()
        w.recipient = current_recipient_from_document(first)
        await w.setup_tenant("a")
        assert (await w.upload("a", w.package("a", "before"))).status_code == 201
    assert main(["keys", "rotate-recipient", "--data-dir", str(tmp_path / "data")]) == 0
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["key_id"] != first["data"][0]["key_id"] and len(rotated["readable"]) == 2
    async with running(tmp_path) as (app, client):
        doc = (await client.get("/v1/tssp/recipient")).json()
        assert [(e["key_id"], e["current"]) for e in doc["data"]] == [
            (first["data"][0]["key_id"], False), (rotated["key_id"], True)]
        w2 = World(client, app, tmp_path)
        w2.keys, w2.signers = w.keys, w.signers
        w2.recipient = current_recipient_from_document(doc)
        r = await client.post(CHAT, json={"model": "before", "messages": HELLO}, headers=w2.h("a"))
        assert r.status_code == 200  # wrapped to the old key, still opens
        assert (await w2.upload("a", w2.package("a", "after", seed=3))).status_code == 201


async def test_audit_verify_command(tmp_path, capsys):
    async with running(tmp_path) as (app, client):
        await World(client, app, tmp_path).setup_tenant("a")
    args = ["audit", "verify", "--data-dir", str(tmp_path / "data")]
    assert await asyncio.to_thread(main, args) == 0
    assert json.loads(capsys.readouterr().out)["intact"] is True
    db = sqlite3.connect(tmp_path / "data" / "tensafe.db")
    db.execute("DELETE FROM audit WHERE seq = 1")
    db.commit()
    db.close()
    assert await asyncio.to_thread(main, args) == 1
    assert json.loads(capsys.readouterr().out)["problems"]


async def test_audit_verify_command_sees_the_newest_entry_deleted(tmp_path, capsys):
    async with running(tmp_path) as (app, client):
        await World(client, app, tmp_path).setup_tenant("a")
    args = ["audit", "verify", "--data-dir", str(tmp_path / "data")]
    db = sqlite3.connect(tmp_path / "data" / "tensafe.db")
    db.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")  # the chain alone stays intact
    db.commit()
    db.close()
    assert await asyncio.to_thread(main, args) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert not verdict["intact"] and "removed from its end" in verdict["problems"][0]


def test_admin_cli_drives_the_admin_api(tmp_path, capsys):
    app = create_app(settings(tmp_path, admin_key=ADMIN, api_key=None))
    with Server(app) as server:
        base = ["admin", "--url", server.url, "--key", ADMIN]
        assert main([*base, "tenants-create", "acme", "--quotas", '{"requests_per_min": 5}']) == 0
        created = json.loads(capsys.readouterr().out)
        assert created["id"] == "acme" and created["quotas"]["requests_per_min"] == 5
        assert main([*base, "keys-issue", "acme", "--scopes", "tenant"]) == 0
        issued = json.loads(capsys.readouterr().out)
        assert issued["key"].startswith("tsk-")
        assert main([*base, "tenants-list"]) == 0
        assert [t["id"] for t in json.loads(capsys.readouterr().out)["data"]] == ["acme"]
        assert main(["admin", "--url", server.url, "--key", issued["key"], "tenants-list"]) == 1
        assert json.loads(capsys.readouterr().out)["error"]["code"] == "admin_required"


@pytest.fixture()
def oidc_key(tmp_path):
    key = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(KeySet([key]).as_dict(private=False)))
    return key, path


def token(key, **claims) -> str:
    now = int(time.time())
    body = {"iss": "https://idp.test", "aud": "tensafe", "sub": "user-1", "tenant": "a", "exp": now + 300,
            "iat": now, **claims}
    return jwt.encode({"alg": "RS256", "kid": "k1"}, body, key)


async def test_oidc_tokens_authenticate_tenants(tmp_path, oidc_key):
    key, jwks = oidc_key
    async with running(tmp_path, oidc_issuer="https://idp.test", oidc_audience="tensafe",
                       oidc_jwks_file=str(jwks)) as (app, client):
        await World(client, app, tmp_path).setup_tenant("a")
        ok = {"authorization": f"Bearer {token(key)}"}
        r = await client.post(CHAT, json={"model": BASE, "messages": HELLO}, headers=ok)
        assert r.status_code == 200
        for bad in (token(key, aud="other"), token(key, iss="https://evil.test"), token(key, exp=int(time.time()) - 600),
                    token(key, tenant="nobody"), token(RSAKey.generate_key(2048, parameters={"kid": "k1"}))):
            r = await client.post(CHAT, json={"model": BASE, "messages": HELLO},
                                  headers={"authorization": f"Bearer {bad}"})
            assert r.status_code == 401, r.text
        r = await client.get("/admin/tenants", headers=ok)
        assert r.status_code == 403
        await client.patch("/admin/tenants/a", json={"suspended": True}, headers={"authorization": f"Bearer {ADMIN}"})
        r = await client.get("/v1/models", headers=ok)
        assert r.status_code == 403


def test_pack_fetches_the_recipient_key_from_the_gateway_url(tmp_path):
    from adapters.keys import generate_signing_key, save_signing_key
    from adapters.package import read_unverified_manifest
    from tests.adapters.builders import SMOLLM2, lora_tensors, peft_config, write_peft_dir

    app = create_app(settings(tmp_path, admin_key=ADMIN, api_key=None))
    with Server(app) as server:
        save_signing_key(tmp_path / "signer", generate_signing_key())
        src = write_peft_dir(tmp_path / "peft", peft_config(2, ("q_proj",)), lora_tensors(SMOLLM2, 2, ("q_proj",)))
        out = tmp_path / "bot.tssp"
        code = main(["adapter", "pack", str(src), "--tenant", "a", "--name", "bot", "--base-model", BASE,
                     "--sign", str(tmp_path / "signer"), "--recipient", server.url + "/v1/tssp/recipient",
                     "-o", str(out)])
        assert code == 0
        current = server.gateway.keys.recipient_keys()[-1].key_id
        assert read_unverified_manifest(out.read_bytes()).recipient_key_id == current
