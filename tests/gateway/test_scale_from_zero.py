"""Scale from zero: a request that finds no ready backend is held until one joins (counted in
``tensafe_held_requests{pool}``, which a scaler reads), within a count and a time bound (503
with Retry-After past either), and its client leaving or its deadline passing frees it at
once; a backend that joins a pool at run time gets the hottest adapters before its first
request. The gateway runs on a real uvicorn with DNS-discovered pools (a resolver the test
controls) of real ``tensafe worker`` apps over the null backend, all in the test's loop."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from adapters.keys import current_recipient_from_document
from gateway.app import create_app
from gateway.backends.null import NullBackend, model_config_of
from gateway.server import uvicorn_config
from gateway.serving.fleet import Fleet, NoBackend
from gateway.serving.hold import HoldLimits
from gateway.settings import Settings, SettingsError
from gateway.worker.app import WorkerLimits, create_worker_app

from .conftest import API_KEY, BASE, settings
from .test_tenancy import ADMIN, CHAT, HELLO, World

TOKEN = "wtok-zero-7c21d9e4"
HOSTS = ("127.0.0.2", "127.0.0.3")
ASK = {"model": BASE, "messages": HELLO, "max_tokens": 2}


class Names:
    """The DNS the pools are discovered through: each name resolves to its ``addresses``."""

    def __init__(self, **addresses: set[str]) -> None:
        self.addresses = {f"{name}.test": set(a) for name, a in addresses.items()}

    async def __call__(self, host: str, port: int) -> set[str]:
        return set(self.addresses[host])


def dns_pool(name: str, port: int, **extra) -> dict:
    return {"name": name, "kind": "tensafe", "discovery": "dns", "dns_name": f"{name}.test", "dns_port": port,
            "dns_interval_s": 3600, "token": TOKEN, **extra}


@contextlib.asynccontextmanager
async def serving(app, host: str, port: int, config: Settings):
    """``app`` on a real uvicorn in this loop, at ``host:port`` (0: any port); yields the port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning", timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


def null_worker(**options) -> tuple[NullBackend, object]:
    """A ``tensafe worker`` app over a null backend (which the test can look into)."""
    backend = NullBackend(name="null", model=BASE, model_config=model_config_of(BASE), tokens=2, **options)
    limits = WorkerLimits(max_body_bytes=1 << 20, max_adapter_bytes=64 << 20, max_queue=backend.max_queue,
                          max_lora_rank=backend.max_lora_rank)
    return backend, create_worker_app(backend, limits, (TOKEN,))


@contextlib.asynccontextmanager
async def gateway(tmp, names: Names, pools: list[dict], **overrides):
    s = settings(tmp, admin_key=ADMIN, pools=json.dumps(pools), health_interval_s=3600, **overrides)
    app = create_app(s, resolver=names)
    async with serving(app, "127.0.0.1", 0, s) as port, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        yield app, client


async def held(client: httpx.AsyncClient) -> dict[str, float]:
    r = await client.get("/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    return {s.labels["pool"]: s.value for f in text_string_to_metric_families(r.text)
            if f.name == "tensafe_held_requests" for s in f.samples}


async def until_held(client: httpx.AsyncClient, expected: dict[str, float], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while (now := await held(client)) != expected:
        assert time.monotonic() < deadline, f"held requests {now}, expected {expected}"
        await asyncio.sleep(0.02)


def free_port_on(hosts: tuple[str, ...]) -> int:
    """A port free on each of ``hosts`` (DNS pools reach every address on one port)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every host")


async def test_a_request_is_held_while_no_backend_is_ready_and_answered_once_one_joins(tmp_path):
    port = free_port_on(HOSTS[:1])
    names = Names(cpu=set(), gpu=set())
    async with gateway(tmp_path, names, [dns_pool("cpu", port), dns_pool("gpu", port)]) as (app, client):
        gw = app.state.gateway
        assert gw.fleet.members == {} and await held(client) == {"cpu": 0, "gpu": 0}  # a sample per pool
        request = asyncio.create_task(client.post(CHAT, json=ASK))
        await until_held(client, {"cpu": 1, "gpu": 1})  # held for every pool without a ready backend
        await asyncio.sleep(0.2)
        assert not request.done()
        backend, worker = null_worker()
        async with serving(worker, HOSTS[0], port, Settings()):
            names.addresses["cpu.test"] = {HOSTS[0]}
            await gw.discovery[0].resolve()  # a replica of pool cpu is ready
            r = await asyncio.wait_for(request, 5)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] and r.json()["usage"]["completion_tokens"] == 2
            assert await held(client) == {"cpu": 0, "gpu": 0}
            assert (await client.post(CHAT, json=ASK)).status_code == 200  # served at once from now on


async def test_past_the_count_bound_a_request_gets_a_503_with_retry_after_at_once(tmp_path):
    names = Names(cpu=set())
    async with gateway(tmp_path, names, [dns_pool("cpu", 1, hold_max_requests=2)]) as (_, client):
        first = [asyncio.create_task(client.post(CHAT, json=ASK)) for _ in range(2)]
        await until_held(client, {"cpu": 2})
        t0 = time.monotonic()
        r = await client.post(CHAT, json=ASK)
        assert time.monotonic() - t0 < 1.0
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "no_backend" and error["type"]
        assert "2 requests wait for a backend of pool cpu already" in error["message"]
        assert not any(t.done() for t in first)
        for task in first:  # their clients give up
            task.cancel()
        await asyncio.gather(*first, return_exceptions=True)
        await until_held(client, {"cpu": 0})


async def test_past_the_time_bound_a_held_request_gets_a_503_with_retry_after(tmp_path):
    names = Names(cpu=set())
    async with gateway(tmp_path, names, [dns_pool("cpu", 1)], hold_timeout_s=0.4) as (_, client):
        t0 = time.monotonic()
        r = await client.post(CHAT, json=ASK)
        waited = time.monotonic() - t0
        assert 0.4 <= waited < 2.0
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "no_backend"
        assert "no backend became ready within 0.4 s" in r.json()["error"]["message"]
        assert await held(client) == {"cpu": 0}


@pytest.mark.parametrize("cause", ["disconnect", "deadline"])
async def test_a_held_request_whose_client_leaves_or_deadline_passes_leaves_the_hold_at_once(tmp_path, caplog,
                                                                                           cause):
    caplog.set_level(logging.INFO, logger="tensafe.access")
    names = Names(cpu=set())
    timeout = 0.5 if cause == "deadline" else 600
    async with gateway(tmp_path, names, [dns_pool("cpu", 1)], request_timeout_s=timeout) as (_, client):
        request = asyncio.create_task(client.post(CHAT, json=ASK))
        await until_held(client, {"cpu": 1})
        if cause == "disconnect":
            request.cancel()  # the client closes its connection
            await asyncio.gather(request, return_exceptions=True)
            await until_held(client, {"cpu": 0}, within_s=0.5)
        else:
            r = await asyncio.wait_for(request, 3)
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
            assert await held(client) == {"cpu": 0}
        deadline = time.monotonic() + 2
        while not (records := [json.loads(rec.getMessage()) for rec in caplog.records
                               if rec.name == "tensafe.access" and CHAT in rec.getMessage()]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        (record,) = records
        assert (record["status"], record["error_code"]) == ((499, "client_disconnected") if cause == "disconnect"
                                                            else (504, "timeout"))


@pytest.mark.parametrize("warm_adapters,slots", [(2, 4), (4, 2)])  # min(setting, free adapter slots) = 2
async def test_a_pool_back_from_zero_gets_its_hottest_adapters_before_its_first_request(tmp_path, warm_adapters,
                                                                                       slots):
    port = free_port_on(HOSTS)
    names = Names(cpu={HOSTS[0]})
    first, first_app = null_worker()
    second, second_app = null_worker(max_loras=slots)
    async with serving(first_app, HOSTS[0], port, Settings()), serving(second_app, HOSTS[1], port, Settings()), \
            gateway(tmp_path, names, [dns_pool("cpu", port)], warm_adapters=warm_adapters) as (app, client):
        gw = app.state.gateway
        w = World(client, app, tmp_path)
        w.recipient = current_recipient_from_document((await client.get("/v1/tssp/recipient")).json())
        await w.setup_tenant("a")
        for i, (name, requests) in enumerate((("x", 3), ("y", 2), ("z", 1))):  # x is the hottest, z the coldest
            assert (await w.upload("a", w.package("a", name, seed=i))).status_code == 201
            for _ in range(requests):
                r = await client.post(CHAT, json={**ASK, "model": name}, headers=w.h("a"))
                assert r.status_code == 200, r.text
        assert set(first.adapters()) == {"a/x@1", "a/y@1", "a/z@1"}
        names.addresses["cpu.test"] = set()  # scaled to zero
        await gw.discovery[0].resolve()
        assert gw.fleet.members == {}
        held_request = asyncio.create_task(client.post(CHAT, json={**ASK, "model": "x"}, headers=w.h("a")))
        await until_held(client, {"cpu": 1})
        names.addresses["cpu.test"] = {HOSTS[1]}  # and back up, on another replica
        await gw.discovery[0].resolve()
        assert sorted(gw.fleet.members) == [f"cpu-{HOSTS[1]}:{port}"]
        assert set(second.adapters()) == {"a/x@1", "a/y@1"} and second.loads == 2  # warmed: the two hottest
        r = await asyncio.wait_for(held_request, 5)
        assert r.status_code == 200, r.text
        assert second.loads == 2  # the held request found its adapter resident: no load on its way
        assert await held(client) == {"cpu": 0}


async def test_a_slow_warm_up_lets_the_backend_join_anyway(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tensafe.gateway")
    port = free_port_on(HOSTS)
    names = Names(cpu={HOSTS[0]})
    _, first_app = null_worker()
    second, second_app = null_worker(load_delay_s=1.5)
    async with serving(first_app, HOSTS[0], port, Settings()), serving(second_app, HOSTS[1], port, Settings()), \
            gateway(tmp_path, names, [dns_pool("cpu", port)], warm_timeout_s=0.3) as (app, client):
        gw = app.state.gateway
        w = World(client, app, tmp_path)
        w.recipient = current_recipient_from_document((await client.get("/v1/tssp/recipient")).json())
        await w.setup_tenant("a")
        assert (await w.upload("a", w.package("a", "x"))).status_code == 201
        assert (await client.post(CHAT, json={**ASK, "model": "x"}, headers=w.h("a"))).status_code == 200
        names.addresses["cpu.test"] = {HOSTS[0], HOSTS[1]}
        t0 = time.monotonic()
        await gw.discovery[0].resolve()
        assert time.monotonic() - t0 < 1.2  # it did not wait for the 1.5 s load
        assert f"cpu-{HOSTS[1]}:{port}" in gw.fleet.members and "a/x@1" not in second.adapters()
        assert any("warm-up did not finish within 0.3 s" in rec.getMessage() for rec in caplog.records)


# ---- the fleet's hold, without HTTP ---------------------------------------------------------
async def started(name: str, **options) -> NullBackend:
    backend = NullBackend(name=name, **options)
    await backend.start()
    return backend


async def pending(task: asyncio.Task) -> None:
    await asyncio.sleep(0.05)
    assert not task.done()


async def test_every_way_a_backend_becomes_ready_wakes_a_held_request():
    fleet = Fleet(holds={"p": HoldLimits(max_requests=8, timeout_s=10)})
    task = asyncio.create_task(fleet.choose_held(None))
    await pending(task)
    member = fleet.add("p", await started("b0"))  # one joins
    assert (await asyncio.wait_for(task, 1))[0] is member and fleet.holds.held == {"p": 0}
    fleet.set_drained({"p/b0"})
    task = asyncio.create_task(fleet.choose_held(None))
    await pending(task)
    assert fleet.holds.held == {"p": 1}
    fleet.set_drained(set())  # undrained
    assert (await asyncio.wait_for(task, 1))[0] is member
    member.up = False  # its last health check failed
    task = asyncio.create_task(fleet.choose_held(None))
    await pending(task)
    await fleet.check()  # and this one passes
    assert (await asyncio.wait_for(task, 1))[0] is member and fleet.holds.held == {"p": 0}
    await fleet.close()


async def test_only_a_fleet_without_a_ready_backend_holds_a_request():
    limits = HoldLimits(max_requests=8, timeout_s=10)
    fleet = Fleet(holds={"p": limits, "q": limits})  # q has no backend at all
    member = fleet.add("p", await started("b0", max_lora_rank=8))
    with pytest.raises(NoBackend, match="rank 16"):  # ready, but unfit: refused at once
        await asyncio.wait_for(fleet.choose_held("a/x@1", rank=16), 0.5)
    for _ in range(3):
        member.breaker.failure()
    assert member.breaker.state == "open"
    with pytest.raises(NoBackend, match="failing"):  # ready, but failing: its breaker fails fast
        await asyncio.wait_for(fleet.choose_held(None), 0.5)
    assert fleet.holds.held == {"p": 0, "q": 0}
    unconfigured = Fleet()  # a pool the fleet holds nothing for
    with pytest.raises(NoBackend, match="no backend is ready"):
        await asyncio.wait_for(unconfigured.choose_held(None), 0.5)
    await fleet.close()


def test_hold_and_warm_bounds_are_checked_at_start(tmp_path):
    with pytest.raises(SettingsError, match="pools"):
        settings(tmp_path, pools=json.dumps([dns_pool("cpu", 1, hold_timeout_s=-1)]))
    for name in ("hold_max_requests", "hold_timeout_s", "warm_adapters", "warm_timeout_s"):
        with pytest.raises(SettingsError, match=name):
            create_app(settings(tmp_path, **{name: -1}))
    gw = create_app(settings(tmp_path, hold_timeout_s=5, pools=json.dumps(
        [dns_pool("cpu", 1, hold_max_requests=3), dns_pool("gpu", 1)]))).state.gateway
    assert gw.fleet.holds.limits == {"cpu": HoldLimits(3, 5.0), "gpu": HoldLimits(256, 5.0)}


async def pool_backends(client: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    r = await client.get("/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    return {(s.labels["pool"], s.labels["state"]): s.value for f in text_string_to_metric_families(r.text)
            if f.name == "tensafe_pool_backends" for s in f.samples}


async def test_a_discovered_address_not_answering_yet_is_starting_and_joins_within_a_second(tmp_path):
    port = free_port_on(HOSTS[:1])
    names = Names(cpu={HOSTS[0]})  # the pod's address is published before it is ready
    async with gateway(tmp_path, names, [dns_pool("cpu", port)]) as (app, client):
        states = await pool_backends(client)
        assert states == {("cpu", "ready"): 0, ("cpu", "starting"): 1, ("cpu", "down"): 0, ("cpu", "drained"): 0}
        request = asyncio.create_task(client.post(CHAT, json=ASK))
        await until_held(client, {"cpu": 1})
        _, worker = null_worker()
        async with serving(worker, HOSTS[0], port, Settings()):
            started = time.monotonic()
            r = await asyncio.wait_for(request, 5)  # no discovery round (3600 s): the retry of pending ones
            assert r.status_code == 200 and time.monotonic() - started < 2.0
            assert await pool_backends(client) == {("cpu", "ready"): 1, ("cpu", "starting"): 0, ("cpu", "down"): 0,
                                                   ("cpu", "drained"): 0}


async def test_a_backend_that_leaves_takes_its_series_with_it(tmp_path):
    port = free_port_on(HOSTS)
    names = Names(cpu={HOSTS[0], HOSTS[1]})
    workers = [null_worker()[1], null_worker()[1]]
    async with serving(workers[0], HOSTS[0], port, Settings()), serving(workers[1], HOSTS[1], port, Settings()):
        async with gateway(tmp_path, names, [dns_pool("cpu", port)]) as (app, client):
            for _ in range(6):
                assert (await client.post(CHAT, json=ASK)).status_code == 200

            async def ttft_backends() -> set[str]:
                r = await client.get("/metrics", headers={"authorization": f"Bearer {ADMIN}"})
                return {s.labels["backend"] for f in text_string_to_metric_families(r.text)
                        if f.name == "tensafe_ttft_seconds" for s in f.samples}

            before = await ttft_backends()
            gone = next(m.name for m in app.state.gateway.fleet.members.values() if HOSTS[1] in m.name)
            assert len(before) == 2 and gone in before
            names.addresses["cpu.test"] = {HOSTS[0]}
            await app.state.gateway.discovery[0].resolve()
            assert await ttft_backends() == before - {gone}


async def test_a_gateway_started_while_its_pool_is_at_zero_takes_uploads_once_a_backend_joins(tmp_path):
    port = free_port_on(HOSTS[:1])
    names = Names(cpu=set())
    _, worker = null_worker()
    async with gateway(tmp_path, names, [dns_pool("cpu", port)]) as (app, client):
        w = World(client, app, tmp_path)
        w.recipient = current_recipient_from_document((await client.get("/v1/tssp/recipient")).json())
        await w.setup_tenant("a")
        early = await w.upload("a", w.package("a", "x"))
        assert early.status_code == 503 and "base model" in early.json()["error"]["message"]
        async with serving(worker, HOSTS[0], port, Settings()):
            names.addresses["cpu.test"] = {HOSTS[0]}
            await app.state.gateway.discovery[0].resolve()
            assert (await w.upload("a", w.package("a", "x"))).status_code == 201
            r = await client.post(CHAT, json={**ASK, "model": "x"}, headers=w.h("a"))
            assert r.status_code == 200, r.text
