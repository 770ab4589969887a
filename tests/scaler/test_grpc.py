"""The scaler as KEDA sees it: a real gRPC client built from KEDA's proto, against the scaler
scraping real gateways (uvicorn on 127.0.0.1, the null backend) with a ``metrics``-scope key."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from gateway.app import create_app
from scaler import externalscaler_pb2 as pb
from scaler import externalscaler_pb2_grpc as pb_grpc
from scaler.service import serve
from scaler.sources import ScrapeSource
from tests.gateway.conftest import BASE, Server, settings

ADMIN = "tsk-admin-scaler"
TENANT_KEY = "tsk-scaler-tenant"
META = {"pool": "default", "ttftSLO": "2s", "quantile": "0.9", "window": "10s", "minRequests": "5",
        "activeCooldown": "2s"}


def ref(**meta: str) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="tensafe-default", namespace="tensafe", scalerMetadata=meta or META)


@contextlib.contextmanager
def gateway(tmp: Path, name: str):
    app = create_app(settings(tmp / name, admin_key=ADMIN, api_key=TENANT_KEY, null_tokens=20,
                              null_token_delay_s=0.05, max_num_seqs=4, health_interval_s=3600))
    with Server(app) as server:
        yield server


async def metrics_key(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}) as c:
        r = await c.post("/admin/keys", json={"scopes": ["metrics"], "name": "scaler"})
        assert r.status_code == 201, r.text
        return r.json()["key"]


@contextlib.asynccontextmanager
async def scaler_for(urls: list[str], key: str, **options) -> AsyncIterator[tuple[pb_grpc.ExternalScalerStub, object]]:
    source = ScrapeSource(urls=urls, key=key, interval_s=0.2, window_s=30, **options)
    server = await serve(source, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.ExternalScalerStub(channel), source
    finally:
        await channel.close()
        await server.stop(grace=None)
        await source.close()


async def load(url: str, n: int) -> list[int]:
    """``n`` chat completions at once (each about 1 s on the null backend: 20 tokens, 50 ms each)."""
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"authorization": f"Bearer {TENANT_KEY}"}) as c:
        body = {"model": BASE, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}
        replies = await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(n)))
    return [r.status_code for r in replies]


async def test_spec_metrics_activation_and_pushes_from_a_gateway_under_load(tmp_path: Path):
    with gateway(tmp_path, "g") as g:
        key = await metrics_key(g.url)
        async with scaler_for([g.url], key) as (stub, _):
            spec = await stub.GetMetricSpec(ref())
            assert [(m.metricName, m.targetSize, m.targetSizeFloat) for m in spec.metricSpecs] == \
                [("ttft-demand-default", 2000, 2000.0)]
            pushed = await anext(aiter(stub.StreamMetricSpec(ref())))
            assert pushed == spec
            assert not (await stub.IsActive(ref())).result
            idle = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(), metricName="s0-ttft-demand-default"))
            assert [(v.metricName, v.metricValue, v.metricValueFloat) for v in idle.metricValues] == \
                [("s0-ttft-demand-default", 0, 0.0)]

            stream = stub.StreamIsActive(ref())
            updates = aiter(stream)
            assert (await anext(updates)).result is False  # the state at once, when opened
            started = time.monotonic()
            traffic = asyncio.create_task(load(g.url, 12))
            assert (await asyncio.wait_for(anext(updates), 5)).result is True
            assert time.monotonic() - started <= 1.0  # pushed within a second of traffic arriving
            await asyncio.sleep(0.6)  # a few scrape rounds while the requests run
            busy = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(), metricName="s0-ttft-demand-default"))
            value = busy.metricValues[0]
            assert value.metricValueFloat > 0 and value.metricValue == round(value.metricValueFloat)
            # 12 requests on 4 slots of the one replica there is: more replicas wanted
            assert value.metricValueFloat > 2000 * 1.1
            assert (await stub.IsActive(ref())).result
            assert all(code == 200 for code in await traffic)
            # the cooldown (2 s) passes with nothing in flight: inactive again, and pushed
            assert (await asyncio.wait_for(anext(updates), 10)).result is False
            assert not (await stub.IsActive(ref())).result
            stream.cancel()


async def test_two_replicas_are_merged(tmp_path: Path):
    with gateway(tmp_path, "a") as a, gateway(tmp_path, "b") as b:
        # the two replicas have a store each here (a fleet shares one): the operator key reads both
        async with scaler_for([a.url, b.url], ADMIN) as (stub, source):
            await asyncio.sleep(0.5)  # a baseline scrape of both
            codes = await asyncio.gather(load(a.url, 7), load(b.url, 5))
            assert all(c == 200 for part in codes for c in part)
            await asyncio.sleep(0.6)
            state = await source.state("default", 0.9, 10.0)
            assert state.requests == 12  # 7 first tokens on a, 5 on b
            assert state.ready == 1  # both replicas name their backend "default"
            reply = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(), metricName="m"))
            assert reply.metricValues[0].metricName == "m"


async def test_bad_metadata_is_invalid_argument_and_a_silent_fleet_unavailable(tmp_path: Path):
    with gateway(tmp_path, "g") as g:
        key = await metrics_key(g.url)
        async with scaler_for([g.url], key, stale_s=1.0) as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.GetMetricSpec(ref(pool="default", ttftSLO="soon"))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttftSLO" in bad.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as nameless:
                await stub.IsActive(pb.ScaledObjectRef(name="x", namespace="y"))
            assert nameless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref()))).metricValues
            g.__exit__(None, None, None)  # the gateway goes away
            await asyncio.sleep(1.5)
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref()))
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_wrong_key_scrapes_nothing(tmp_path: Path):
    with gateway(tmp_path, "g") as g:
        async with scaler_for([g.url], "tsk-not-a-key", stale_s=1.0) as (stub, source):
            await asyncio.sleep(0.5)
            assert source.failures == {g.url: "HTTPStatusError"}
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await stub.IsActive(ref())
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_replicas_found_through_dns_are_scraped(tmp_path: Path):
    with gateway(tmp_path, "a") as a:
        addresses = {"127.0.0.1"}

        async def resolver(host: str, port: int) -> list[str]:
            assert host == "tensafe-gateway.test"
            return sorted(addresses)

        # the headless Service's name gives the replicas' addresses, the port is the scaler's setting
        source = ScrapeSource(dns=("tensafe-gateway.test", a.port), key=ADMIN, interval_s=0.1, resolver=resolver)
        try:
            await source.scrape_once()
            assert set(source.watch.replicas) == {f"http://127.0.0.1:{a.port}"}
            addresses.clear()  # the replica went: the name no longer lists it
            await source.scrape_once()
            assert await source.targets() == []
        finally:
            await source.close()
