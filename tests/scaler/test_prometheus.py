"""The scaler asking a real Prometheus (PromQL) that scrapes a real gateway with a metrics key."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from scaler import externalscaler_pb2 as pb
from scaler import externalscaler_pb2_grpc as pb_grpc
from scaler.service import serve
from scaler.sources import PromSource
from tests.prometheus_server import PrometheusServer
from tests.scaler.test_grpc import META, gateway, load, metrics_key, ref


async def test_promql_source_reads_the_gateways_numbers(tmp_path: Path):
    with gateway(tmp_path, "g") as g:
        key = await metrics_key(g.url)
        prom = PrometheusServer([f"127.0.0.1:{g.port}"], bearer=key, interval_s=0.5)
        try:
            await asyncio.to_thread(prom.wait_scraped)
            source = PromSource(prom.url, interval_s=0.2)
            idle = await source.state("default", 0.9, 10.0, 2.0)
            assert idle.requests == 0 and idle.ttft_quantile_s is None and idle.ready == 1 and idle.slots == 4
            traffic = asyncio.create_task(load(g.url, 12))
            await asyncio.sleep(1.5)  # Prometheus scrapes the gateway while the requests run
            busy = await source.state("default", 0.9, 10.0, 2.0)
            assert busy.in_flight > 0 and busy.idle_s == 0
            assert all(code == 200 for code in await traffic)
            await asyncio.sleep(1.5)
            done = await source.state("default", 0.9, 10.0, 2.0)
            assert 6 <= done.requests <= 16  # 12 first tokens, as Prometheus extrapolates increase()
            assert 0 < done.ttft_quantile_s < 5
            server = await serve(source, "127.0.0.1:0")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.ExternalScalerStub(channel)
                # requests within the last 30 s: active
                assert (await stub.IsActive(ref(**{**META, "activeCooldown": "30s"}))).result
                reply = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(), metricName="m"))
                assert reply.metricValues[0].metricValueFloat > 0
            await server.stop(grace=None)
            await source.close()
        finally:
            prom.stop()
