"""A pool of two real ``tensafe worker`` processes (the real model) found by DNS discovery (a
resolver the test controls): replicas that come and go join and leave, an adapter's requests
stay on its worker, a killed worker is routed around before the first token and ends a stream
with an OpenAI-shaped error after it, and two gateway replicas sharing Redis and the workers
dispatch consistently, share quotas and honour one drain. The workers serve the module; the
test that kills one runs last."""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import httpx
import pytest

from adapters.keys import current_recipient_from_document
from gateway.app import create_app

from .conftest import BASE, Server, settings
from .test_serve import Proc, free_port
from .test_tenancy import ADMIN, CHAT, HELLO, World

pytestmark = pytest.mark.slow
TOKEN = "wtok-fleet-31d9c0aa"
HOSTS = ("127.0.0.2", "127.0.0.3")
ENGINE = ["--max-num-seqs", "2", "--max-model-len", "256", "--max-loras", "2", "--max-lora-rank", "8"]


class Names:
    """The DNS the pool is discovered through: ``workers.test`` resolves to ``addresses``."""

    def __init__(self, addresses: set[str]) -> None:
        self.addresses = set(addresses)

    async def __call__(self, host: str, port: int) -> set[str]:
        assert host == "workers.test"
        return set(self.addresses)


@pytest.fixture(scope="module")
def workers(tmp_path_factory, checkpoint):
    port = free_port()
    procs = {}
    try:
        for host in HOSTS:
            procs[host] = Proc(tmp_path_factory.mktemp(f"worker-{host}"), "--model", str(checkpoint), *ENGINE,
                               verb="worker", ready="/health", env={"TENSAFE_WORKER_TOKENS": TOKEN}, host=host,
                               port=port)
        yield port, procs
    finally:
        for proc in procs.values():
            if proc.p.poll() is None:
                proc.stop()
            else:
                proc.wait()  # killed: reap it and close its pipes


def pool(port: int) -> str:
    return json.dumps([{"name": "cpu", "kind": "tensafe", "discovery": "dns", "dns_name": "workers.test",
                        "dns_port": port, "dns_interval_s": 3600, "token": TOKEN}])


@contextlib.asynccontextmanager
async def gateway(tmp, port: int, names: Names, **overrides):
    app = create_app(settings(tmp, admin_key=ADMIN, api_key=None, pools=pool(port), health_interval_s=3600,
                              breaker_failures=1, **overrides), resolver=names)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw", timeout=60) as client:
            yield app, client


async def tenant_world(app, client, tmp, adapters=("mine",)) -> World:
    w = World(client, app, tmp)
    w.recipient = current_recipient_from_document((await client.get("/v1/tssp/recipient")).json())
    await w.setup_tenant("a")
    for i, name in enumerate(adapters):
        assert (await w.upload("a", w.package("a", name, seed=10 + i))).status_code == 201
    return w


def on_workers(app, adapter: str) -> list[str]:
    return sorted(m.name for m in app.state.gateway.fleet.members.values() if adapter in m.backend.adapters())


async def test_dns_discovery_adds_a_new_worker_and_drops_a_gone_one(tmp_path, workers):
    port, _ = workers
    names = Names({HOSTS[0]})
    async with gateway(tmp_path, port, names, hold_timeout_s=0.5) as (app, client):
        gw = app.state.gateway
        assert sorted(gw.fleet.members) == [f"cpu-{HOSTS[0]}:{port}"]
        w = await tenant_world(app, client, tmp_path)
        assert (await client.post(CHAT, json={"model": BASE, "messages": HELLO, "max_tokens": 4},
                                  headers=w.h("a"))).status_code == 200
        names.addresses.add(HOSTS[1])
        await gw.discovery[0].resolve()
        assert sorted(gw.fleet.members) == sorted(f"cpu-{h}:{port}" for h in HOSTS)
        names.addresses.discard(HOSTS[0])
        await gw.discovery[0].resolve()
        assert sorted(gw.fleet.members) == [f"cpu-{HOSTS[1]}:{port}"]
        r = await client.post(CHAT, json={"model": "mine", "messages": HELLO, "max_tokens": 4}, headers=w.h("a"))
        assert r.status_code == 200 and on_workers(app, "a/mine@1") == [f"cpu-{HOSTS[1]}:{port}"]
        names.addresses.clear()  # none left: a request waits for one (hold_timeout_s), then gets a 503
        await gw.discovery[0].resolve()
        r = await client.post(CHAT, json={"model": BASE, "messages": HELLO}, headers=w.h("a"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_backend" and r.headers["retry-after"]
        assert "within 0.5 s" in r.json()["error"]["message"]


async def test_an_adapters_requests_stay_on_its_worker(tmp_path, workers):
    port, _ = workers
    async with gateway(tmp_path, port, Names(set(HOSTS))) as (app, client):
        w = await tenant_world(app, client, tmp_path, ("mine", "other"))
        for _ in range(4):
            r = await client.post(CHAT, json={"model": "mine", "messages": HELLO, "max_tokens": 4}, headers=w.h("a"))
            assert r.status_code == 200
        assert len(on_workers(app, "a/mine@1")) == 1
        assert app.state.gateway.cache.counters.loads == 1


async def test_two_replicas_sharing_redis_agree_share_quotas_and_one_drain(tmp_path, workers, redis_server,
                                                                           redis_client):
    port, _ = workers
    shared = {"store_url": redis_server.url, "quota_redis_url": redis_server.url}
    # replicas share the store, the keys and the blob volume: one data_dir
    async with gateway(tmp_path, port, Names(set(HOSTS)), **shared) as (app1, c1), \
            gateway(tmp_path, port, Names(set(HOSTS)), **shared) as (app2, c2):
        w = await tenant_world(app1, c1, tmp_path, ("mine",))
        await c1.patch("/admin/tenants/a", json={"quotas": {"requests_per_min": 6}}, headers=w.h("admin"))
        key = w.h("a")
        assert (await c1.post(CHAT, json={"model": "mine", "messages": HELLO, "max_tokens": 2},
                              headers=key)).status_code == 200
        [home] = on_workers(app1, "a/mine@1")
        await asyncio.sleep(0.7)  # the second replica's view of the workers refreshes (0.5 s)
        app2.state.gateway.fleet.refresh(force=True)
        assert (await c2.post(CHAT, json={"model": "mine", "messages": HELLO, "max_tokens": 2},
                              headers=key)).status_code == 200
        assert on_workers(app2, "a/mine@1") == [home]  # it went where the adapter was, not a second copy
        codes = await asyncio.gather(*(client.post(CHAT, json={"model": BASE, "messages": HELLO, "max_tokens": 1},
                                                   headers=key) for client in (c1, c2) * 4))
        assert [r.status_code for r in codes].count(200) == 4  # 6 a minute in all, 2 used above
        other = next(m for m in app1.state.gateway.fleet.members.values() if m.name != home)
        r = await c1.post(f"/admin/backends/cpu/{other.name}/drain", headers=w.h("admin"))
        assert r.status_code == 200
        await app2.state.gateway._check_fleet()
        assert app2.state.gateway.fleet.members[other.name].drained


async def test_fair_sharing_over_a_worker(tmp_path, workers):
    port, _ = workers
    async with gateway(tmp_path, port, Names({HOSTS[1]})) as (app, client):
        w = World(client, app, tmp_path)
        await w.setup_tenant("gold", quotas={"weight": 2})
        await w.setup_tenant("bronze")
        finished: list[str] = []

        async def one(tenant: str) -> None:
            r = await client.post("/v1/completions", json={"model": BASE, "prompt": "1, 2, 3,", "max_tokens": 6,
                                                           "temperature": 0}, headers=w.h(tenant))
            assert r.status_code == 200
            finished.append(tenant)

        await asyncio.gather(*(one(t) for t in ["gold"] * 18 + ["bronze"] * 18))
        first = finished[:18]  # both backlogged throughout (two sequence slots)
        assert 1.5 <= first.count("gold") / first.count("bronze") <= 3.0


def test_a_killed_worker_is_routed_around_and_ends_a_stream_in_flight_with_an_error(tmp_path, workers):
    """On a real uvicorn (the in-process transport would buffer the whole stream)."""
    port, procs = workers
    app = create_app(settings(tmp_path, admin_key=ADMIN, api_key="tsk-fleet-kill", pools=pool(port),
                              health_interval_s=3600, breaker_failures=1), resolver=Names(set(HOSTS)))
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60,
                                             headers={"authorization": "Bearer tsk-fleet-kill"}) as client:
        fleet = server.gateway.fleet
        doomed, survivor = (fleet.members[f"cpu-{h}:{port}"] for h in HOSTS)
        survivor.drained = True  # the stream goes to the doomed worker
        # counting goes on for as long as it may: the stream is still running when its worker dies
        body = {"model": BASE, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 200, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            procs[HOSTS[0]].p.send_signal(signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] != "data: [DONE]" and len(rest) < 199  # no clean end: the stream broke
        error = json.loads(rest[-1].removeprefix("data: "))
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["code"] == "backend_unavailable"
        survivor.drained = False
        replies = [client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3}) for _ in range(3)]
        assert [r.status_code for r in replies] == [200, 200, 200]  # retried on the survivor before any token
        assert doomed.breaker.state == "open"
