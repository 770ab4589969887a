"""Multi-tenancy through the real app (null backend, real store, real cryptography): uploads,
the isolation matrix, revocation, suspension, quotas, deletion and restarts."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import httpx
import pytest

from adapters.keys import current_recipient_from_document, generate_signing_key
from adapters.package import pack
from gateway.app import create_app
from tests.adapters.builders import SMOLLM2, lora_tensors, peft_config, write_peft_dir

from .conftest import BASE, settings, validate

ADMIN = "tsk-admin-for-tests"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


class World:
    """One gateway with tenants a and b, each with a key, a signing key and one adapter."""

    def __init__(self, client: httpx.AsyncClient, app, tmp: Path) -> None:
        self.client, self.app, self.tmp = client, app, tmp
        self.keys: dict[str, str] = {}
        self.key_ids: dict[str, str] = {}
        self.signers: dict[str, object] = {}
        self.recipient = None

    def h(self, who: str) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN if who == 'admin' else self.keys[who]}"}

    async def setup_tenant(self, tenant: str, quotas: dict | None = None) -> None:
        r = await self.client.post("/admin/tenants", json={"id": tenant, "name": tenant.upper(),
                                                            "quotas": quotas or {}}, headers=self.h("admin"))
        assert r.status_code == 201, r.text
        r = await self.client.post(f"/admin/tenants/{tenant}/keys", json={"scopes": ["tenant", "tenant-admin"]},
                                   headers=self.h("admin"))
        assert r.status_code == 201, r.text
        self.keys[tenant], self.key_ids[tenant] = r.json()["key"], r.json()["id"]
        signer = generate_signing_key()
        self.signers[tenant] = signer
        pems = {k: v.decode() for k, v in signer.public_key().to_pems().items()}
        r = await self.client.post("/v1/signing-keys", json=pems, headers=self.h(tenant))
        assert r.status_code == 201, r.text

    def package(self, tenant: str, name: str, signer_of: str | None = None, seed: int = 0, version: str = "1") -> bytes:
        src = write_peft_dir(self.tmp / f"src-{tenant}-{name}-{seed}", peft_config(4, ("q_proj",), alpha=8),
                             lora_tensors(SMOLLM2, 4, ("q_proj",), seed=seed))
        return pack(src, tenant=tenant, name=name, version=version, base_model=BASE,
                    signer=self.signers[signer_of or tenant], recipient=self.recipient)

    async def upload(self, who: str, data: bytes) -> httpx.Response:
        return await self.client.post("/v1/adapters", content=data, headers={
            **self.h(who), "content-type": "application/octet-stream"})

    @property
    def gateway(self):
        return self.app.state.gateway


@contextlib.asynccontextmanager
async def running(tmp: Path, **overrides):
    app = create_app(settings(tmp, admin_key=ADMIN, api_key=None, **overrides))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
            yield app, client


@pytest.fixture()
async def world(tmp_path):
    async with running(tmp_path) as (app, client):
        w = World(client, app, tmp_path)
        doc = (await client.get("/v1/tssp/recipient")).json()
        w.recipient = current_recipient_from_document(doc)
        for tenant in ("a", "b"):
            await w.setup_tenant(tenant)
            r = await w.upload(tenant, w.package(tenant, f"{tenant}-bot"))
            assert r.status_code == 201, r.text
        yield w


async def test_upload_then_serve_through_the_cache(world):
    r = await world.client.get("/v1/adapters", headers=world.h("a"))
    assert [a["id"] for a in r.json()["data"]] == ["a-bot"] and r.json()["object"] == "list"
    assert r.json()["data"][0]["rank"] == 4 and r.json()["data"][0]["base_model"] == BASE
    models = (await world.client.get("/v1/models", headers=world.h("a"))).json()
    validate(models, "ListModelsResponse")
    assert [m["id"] for m in models["data"]] == [BASE, "a-bot"]
    r = await world.client.post(CHAT, json={"model": "a-bot", "messages": HELLO}, headers=world.h("a"))
    assert r.status_code == 200 and r.headers["x-tensafe-adapter"] == "a-bot"
    assert r.json()["model"] == "a-bot"
    assert world.gateway.backend.adapters() == ["a/a-bot@1"]
    status = world.gateway.cache.status("a/a-bot@1")
    assert status.state.value == "in_slot"


async def test_isolation_matrix(world):
    b_key_id = world.key_ids["b"]
    attempts = [
        ("POST", CHAT, {"json": {"model": "b-bot", "messages": HELLO}}, 404, "model_not_found"),
        ("POST", "/v1/completions", {"json": {"model": "b-bot", "prompt": "x"}}, 404, "model_not_found"),
        ("GET", "/v1/models/b-bot", {}, 404, "model_not_found"),
        ("GET", "/v1/adapters/b-bot", {}, 404, "adapter_not_found"),
        ("DELETE", "/v1/adapters/b-bot", {}, 404, "adapter_not_found"),
        ("DELETE", f"/v1/keys/{b_key_id}", {}, 404, "key_not_found"),
        ("GET", "/admin/tenants", {}, 403, "admin_required"),
        ("GET", "/admin/tenants/b", {}, 403, "admin_required"),
        ("DELETE", "/admin/tenants/b/adapters/b-bot", {}, 403, "admin_required"),
        ("GET", "/admin/audit", {}, 403, "admin_required"),
    ]
    for method, path, kwargs, status, code in attempts:
        r = await world.client.request(method, path, headers=world.h("a"), **kwargs)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (method, path, r.text)
        validate(r.json(), "ErrorResponse")
    # an upload "as b": b's package signed by b does not verify under a's signing keys ...
    r = await world.upload("a", world.package("b", "stolen"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_package"
    # ... and a package naming tenant b signed with a's own key is refused too
    r = await world.upload("a", world.package("b", "forged", signer_of="a"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_mismatch"
    # nothing of b is visible to a, and b's things are intact
    names = [m["id"] for m in (await world.client.get("/v1/models", headers=world.h("a"))).json()["data"]]
    assert "b-bot" not in names
    keys = (await world.client.get("/v1/keys", headers=world.h("a"))).json()["data"]
    assert {k["tenant"] for k in keys} == {"a"} and all("key" not in k and "digest" not in k for k in keys)
    r = await world.client.post(CHAT, json={"model": "b-bot", "messages": HELLO}, headers=world.h("b"))
    assert r.status_code == 200
    usage = (await world.client.get("/v1/usage", headers=world.h("a"))).json()
    assert {row["model"] for row in usage["data"]} <= {BASE, "a-bot"}


async def test_revocation_and_suspension_take_effect_at_once(world):
    assert (await world.client.get("/v1/models", headers=world.h("a"))).status_code == 200
    r = await world.client.delete(f"/admin/keys/{world.key_ids['a']}", headers=world.h("admin"))
    assert r.json()["revoked"] is not None
    r = await world.client.get("/v1/models", headers=world.h("a"))
    assert r.status_code == 401
    r = await world.client.patch("/admin/tenants/b", json={"suspended": True}, headers=world.h("admin"))
    assert r.json()["suspended"] is True
    r = await world.client.post(CHAT, json={"model": BASE, "messages": HELLO}, headers=world.h("b"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_suspended"
    await world.client.patch("/admin/tenants/b", json={"suspended": False}, headers=world.h("admin"))
    assert (await world.client.get("/v1/models", headers=world.h("b"))).status_code == 200


async def test_failed_uploads_leave_nothing_behind(world):
    blobs = world.gateway.blobs
    before = blobs.names()
    data = bytearray(world.package("a", "broken", seed=5))
    data[-10] ^= 1
    r = await world.upload("a", bytes(data))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_package"
    r = await world.upload("a", world.package("a", "a-bot", seed=6))
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    r = await world.upload("a", b"TSSP" + b"\0" * 100)
    assert r.status_code == 400
    assert blobs.names() == before
    names = [a["id"] for a in (await world.client.get("/v1/adapters", headers=world.h("a"))).json()["data"]]
    assert names == ["a-bot"]
    assert not list(blobs.root.glob(".*tmp"))


async def test_upload_size_limit(tmp_path):
    async with running(tmp_path, max_upload_bytes=1000) as (app, client):
        w = World(client, app, tmp_path)
        w.recipient = current_recipient_from_document((await client.get("/v1/tssp/recipient")).json())
        await w.setup_tenant("a")
        r = await w.upload("a", w.package("a", "big"))
        assert r.status_code == 413
        assert app.state.gateway.blobs.names() == set()


async def test_scopes_and_self_service_keys(world):
    r = await world.client.post("/v1/keys", json={"scopes": ["tenant"], "name": "app"}, headers=world.h("a"))
    assert r.status_code == 201
    plain, plain_id = r.json()["key"], r.json()["id"]
    assert r.json()["prefix"] == plain[:12]
    world.keys["a-plain"] = plain
    # a plain tenant key serves models but cannot manage keys
    assert (await world.client.post(CHAT, json={"model": "a-bot", "messages": HELLO},
                                    headers=world.h("a-plain"))).status_code == 200
    r = await world.client.post("/v1/keys", json={"scopes": ["tenant"]}, headers=world.h("a-plain"))
    assert r.status_code == 403
    r = await world.client.post("/v1/keys", json={"scopes": ["admin"]}, headers=world.h("a"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "scopes"
    assert (await world.client.delete(f"/v1/keys/{plain_id}", headers=world.h("a"))).status_code == 200
    assert (await world.client.get("/v1/models", headers=world.h("a-plain"))).status_code == 401


async def test_signing_key_rotation(world):
    old = world.signers["a"].key_id
    new = generate_signing_key()
    pems = {k: v.decode() for k, v in new.public_key().to_pems().items()}
    assert (await world.client.post("/v1/signing-keys", json=pems, headers=world.h("a"))).status_code == 201
    r = await world.client.delete(f"/v1/signing-keys/{old}", headers=world.h("a"))
    assert r.json()["revoked"] is not None
    r = await world.upload("a", world.package("a", "after-rotation-old-key", seed=7))
    assert r.status_code == 400  # signed by the revoked key
    world.signers["a"] = new
    assert (await world.upload("a", world.package("a", "after-rotation", seed=7))).status_code == 201
    # packages signed before the rotation keep serving
    r = await world.client.post(CHAT, json={"model": "a-bot", "messages": HELLO}, headers=world.h("a"))
    assert r.status_code == 200


async def test_adapter_delete_removes_every_tier(world):
    await world.client.post(CHAT, json={"model": "a-bot", "messages": HELLO}, headers=world.h("a"))
    blob = (await world.gateway.store.get_adapter("a", "a-bot")).blob
    r = await world.client.delete("/v1/adapters/a-bot", headers=world.h("a"))
    assert r.json()["deleted"] is True
    assert world.gateway.backend.adapters() == []
    assert not world.gateway.blobs.path(blob).exists()
    r = await world.client.post(CHAT, json={"model": "a-bot", "messages": HELLO}, headers=world.h("a"))
    assert r.status_code == 404


async def test_a_replaced_adapter_serves_its_new_version_at_once(world):
    """The route remembered for a busy adapter is dropped when the adapter is deleted."""
    r = await world.client.post(CHAT, json={"model": "a-bot", "messages": HELLO}, headers=world.h("a"))
    assert r.status_code == 200 and world.gateway.backend.adapters() == ["a/a-bot@1"]
    assert (await world.client.delete("/v1/adapters/a-bot", headers=world.h("a"))).status_code == 200
    assert (await world.upload("a", world.package("a", "a-bot", seed=5, version="2"))).status_code == 201
    r = await world.client.post(CHAT, json={"model": "a-bot", "messages": HELLO}, headers=world.h("a"))
    assert r.status_code == 200 and world.gateway.backend.adapters() == ["a/a-bot@2"]


async def test_tenant_deletion_cascades_and_is_audited(world):
    await world.client.post(CHAT, json={"model": "b-bot", "messages": HELLO}, headers=world.h("b"))
    r = await world.client.delete("/admin/tenants/b", headers=world.h("admin"))
    assert r.status_code == 200
    assert (await world.client.get("/v1/models", headers=world.h("b"))).status_code == 401
    adapters = (await world.client.get("/admin/adapters", headers=world.h("admin"))).json()["data"]
    assert [(x["tenant"], x["id"]) for x in adapters] == [("a", "a-bot")]
    assert len(world.gateway.blobs.names()) == 1 and world.gateway.backend.adapters() == []
    audit = (await world.client.get("/admin/audit", headers=world.h("admin"))).json()["data"]
    assert audit[-1]["action"] == "tenant.delete" and audit[-1]["target"] == "b"
    assert {"tenant.create", "key.issue", "signing_key.register", "adapter.upload"} <= {e["action"] for e in audit}
    verdict = (await world.client.get("/admin/audit/verify", headers=world.h("admin"))).json()
    assert verdict["intact"] and verdict["entries"] == len(audit)


@pytest.mark.parametrize("tampering,problem", [
    ("UPDATE audit SET actor = 'someone-else' WHERE seq = 2", "entry 2"),
    ("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)", "entries were removed from its end"),  # the newest
])
async def test_a_tampered_audit_log_is_detected(world, tampering, problem):
    db = sqlite3.connect(world.gateway.store.path)
    db.execute(tampering)
    db.commit()
    db.close()
    verdict = (await world.client.get("/admin/audit/verify", headers=world.h("admin"))).json()
    assert not verdict["intact"] and problem in verdict["problems"][0]


async def test_a_recreated_tenant_starts_with_no_usage(world):
    """Neither the deleted tenant's unwritten usage nor a request of its that ends after the
    deletion lands on a new tenant with the same id."""
    for _ in range(3):
        r = await world.client.post(CHAT, json={"model": "b-bot", "messages": HELLO}, headers=world.h("b"))
        assert r.status_code == 200
    old_key = world.keys["b"]
    async with world.client.stream("POST", CHAT, json={"model": BASE, "messages": HELLO, "stream": True},
                                   headers=world.h("b")) as in_flight:
        assert in_flight.status_code == 200
        assert (await world.client.delete("/admin/tenants/b", headers=world.h("admin"))).status_code == 200
        await world.setup_tenant("b")  # the same id again, with a new key
        assert world.keys["b"] != old_key
        body = "".join([part async for part in in_flight.aiter_text()])  # the old tenant's request ends now
    assert body.endswith("data: [DONE]\n\n")
    usage = (await world.client.get("/v1/usage", headers=world.h("b"))).json()
    assert usage["data"] == [] and usage["total"]["requests"] == 0
    assert (await world.client.get("/admin/tenants/b/usage", headers=world.h("admin"))).json()["data"] == []
    r = await world.client.post(CHAT, json={"model": BASE, "messages": HELLO}, headers=world.h("b"))
    assert r.status_code == 200
    usage = (await world.client.get("/v1/usage", headers=world.h("b"))).json()
    assert usage["total"]["requests"] == 1  # the new tenant's own requests count


async def test_usage_counted_for_a_deleted_incarnation_is_dropped(world):
    old = await world.gateway.auth.authenticate(f"Bearer {world.keys['b']}")
    assert (await world.client.delete("/admin/tenants/b", headers=world.h("admin"))).status_code == 200
    await world.setup_tenant("b")
    world.gateway.usage.add("b", BASE, 7, 9, old.incarnation)  # a request of the old tenant, ending now
    await world.gateway.usage.flush()
    assert await world.gateway.store.usage("b") == []


async def test_admin_lists_page(world):
    for i in range(3):
        await world.client.post("/admin/tenants", json={"id": f"t{i}"}, headers=world.h("admin"))
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = (await world.client.get("/admin/tenants", params=params, headers=world.h("admin"))).json()
        seen += [t["id"] for t in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ["a", "b", "t0", "t1", "t2"]
    r = await world.client.get("/admin/tenants", params={"limit": 0}, headers=world.h("admin"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


async def test_bad_admin_input_is_a_clear_4xx(world):
    cases = [
        ("POST", "/admin/tenants", {"id": "Bad Id!"}, 400),
        ("POST", "/admin/tenants", {"id": "a"}, 409),
        ("POST", "/admin/tenants", {"name": "x"}, 400),
        ("POST", "/admin/tenants", {"id": "q", "quotas": {"requests_per_min": -1}}, 400),
        ("POST", "/admin/tenants", {"id": "q", "quotas": {"bogus": 1}}, 400),
        ("PATCH", "/admin/tenants/a", {"suspended": "yes"}, 400),
        ("GET", "/admin/tenants/nobody", None, 404),
        ("POST", "/admin/tenants/a/keys", {"scopes": ["root"]}, 400),
        ("POST", "/admin/tenants/a/signing-keys", {"ed25519_pem": "x", "mldsa_pem": "y"}, 400),
        ("DELETE", "/admin/keys/key_nope", None, 404),
        ("POST", "/admin/cache/a/a-bot/explode", None, 404),
    ]
    for method, path, body, status in cases:
        r = await world.client.request(method, path, json=body, headers=world.h("admin"))
        assert r.status_code == status, (method, path, r.text)
        validate(r.json(), "ErrorResponse")


async def test_restart_keeps_tenants_keys_adapters_and_audit(tmp_path):
    async with running(tmp_path) as (app, client):
        w = World(client, app, tmp_path)
        w.recipient = current_recipient_from_document((await client.get("/v1/tssp/recipient")).json())
        await w.setup_tenant("a")
        assert (await w.upload("a", w.package("a", "kept"))).status_code == 201
        audit_before = (await client.get("/admin/audit", headers=w.h("admin"))).json()["data"]
    async with running(tmp_path) as (app, client):
        w2 = World(client, app, tmp_path)
        w2.keys = w.keys
        r = await client.post(CHAT, json={"model": "kept", "messages": HELLO}, headers=w2.h("a"))
        assert r.status_code == 200 and r.headers["x-tensafe-adapter"] == "kept"
        audit_after = (await client.get("/admin/audit", headers=w2.h("admin"))).json()["data"]
        assert audit_after[: len(audit_before)] == audit_before
        assert (await client.get("/admin/audit/verify", headers=w2.h("admin"))).json()["intact"]


async def test_requests_per_minute_quota_under_concurrency(tmp_path):
    async with running(tmp_path) as (app, client):
        w = World(client, app, tmp_path)
        await w.setup_tenant("q", quotas={"requests_per_min": 10})
        results = await asyncio.gather(*(client.post(CHAT, json={"model": BASE, "messages": HELLO},
                                                     headers=w.h("q")) for _ in range(50)))
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) == 10 and codes.count(429) == 40
        refused = next(r for r in results if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        validate(refused.json(), "ErrorResponse")


async def test_quota_shared_by_two_replicas_through_redis(tmp_path, redis_server, redis_client):
    store = f"redis://127.0.0.1:{redis_server.port}/0"
    # two replicas share the Redis store, the quota buckets and the data directory (keys, blobs)
    async with running(tmp_path, store_url=store, quota_redis_url=store) as (app1, c1), \
            running(tmp_path, store_url=store, quota_redis_url=store) as (app2, c2):
        w = World(c1, app1, tmp_path)
        await w.setup_tenant("q", quotas={"requests_per_min": 10})
        body = {"model": BASE, "messages": HELLO}
        results = await asyncio.gather(*(c.post(CHAT, json=body, headers=w.h("q"))
                                         for _ in range(25) for c in (c1, c2)))
        assert sum(r.status_code == 200 for r in results) == 10
        assert sum(r.status_code == 429 for r in results) == 40


async def test_max_tokens_cap_and_concurrency_quota(tmp_path):
    async with running(tmp_path, null_token_delay_s=0.02) as (app, client):
        w = World(client, app, tmp_path)
        await w.setup_tenant("q", quotas={"max_tokens": 8, "concurrent": 1})
        r = await client.post(CHAT, json={"model": BASE, "messages": HELLO, "max_tokens": 9}, headers=w.h("q"))
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        slow = asyncio.create_task(client.post(CHAT, json={"model": BASE, "messages": HELLO}, headers=w.h("q")))
        await asyncio.sleep(0.05)
        r = await client.post(CHAT, json={"model": BASE, "messages": HELLO}, headers=w.h("q"))
        assert r.status_code == 429
        done = await slow
        assert done.json()["usage"]["completion_tokens"] == 8  # the cap is the default max_tokens
        r = await client.post(CHAT, json={"model": BASE, "messages": HELLO}, headers=w.h("q"))
        assert r.status_code == 200


async def test_admin_cache_pin_unpin_evict_and_stats(world):
    admin = world.h("admin")
    r = await world.client.post("/admin/cache/a/a-bot/pin", headers=admin)
    assert r.status_code == 200 and r.json()["pinned"] is True and "cpu" in r.json()["tiers"]
    r = await world.client.post("/admin/cache/a/a-bot/evict", headers=admin)
    assert r.status_code == 409 and r.json()["error"]["code"] == "cache_conflict"
    assert (await world.client.post("/admin/cache/a/a-bot/unpin", headers=admin)).json()["pinned"] is False
    r = await world.client.post("/admin/cache/a/a-bot/evict", headers=admin)
    assert r.status_code == 200 and "cpu" not in r.json()["tiers"]
    assert (await world.client.post("/admin/cache/b/a-bot/pin", headers=admin)).status_code == 404
    stats = (await world.client.get("/admin/cache", headers=admin)).json()
    assert stats["enabled"] and stats["fetches"] >= 1 and stats["cpu"]["budget_bytes"] == 1024 << 20
    tenant = (await world.client.get("/admin/cache", params={"tenant": "a"}, headers=admin)).json()
    assert tenant["cpu_adapters"] == 0
    audit = (await world.client.get("/admin/audit", headers=admin)).json()["data"]
    assert [e["action"] for e in audit[-3:]] == ["cache.pin", "cache.unpin", "cache.evict"]
