"""KEDA's ExternalScaler service over gRPC (``externalscaler.proto``).

One ScaledObject per pool; its ``scalerMetadata`` is parsed into a ``PoolConfig`` (bad
metadata is INVALID_ARGUMENT naming the field). ``GetMetricSpec`` gives the SLO as target
(``targetSize`` and ``targetSizeFloat``, in milliseconds); ``GetMetrics`` the pool's demand
(``metricValue`` and ``metricValueFloat``; see ``demand``); ``IsActive`` whether the pool has
traffic. ``StreamIsActive`` answers at once, then pushes whenever activity changes (checked
after every scrape round: within a second of traffic reaching an idle pool);
``StreamMetricSpec`` sends the spec when opened and keeps the stream open (the SLO comes from
the metadata, so it changes only with a new ScaledObject). A source that cannot be read is
UNAVAILABLE: KEDA then counts failures towards the ScaledObject's ``fallback``.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from . import externalscaler_pb2 as pb
from . import externalscaler_pb2_grpc as pb_grpc
from .demand import BadMetadata, Decision, PoolConfig, decide, is_active
from .sources import Source

log = logging.getLogger("tensafe.scaler")


class ExternalScaler(pb_grpc.ExternalScalerServicer):
    def __init__(self, source: Source) -> None:
        self.source = source
        self.last: dict[str, Decision] = {}  # pool -> the latest answer (shown in logs)

    async def _config(self, ref: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> PoolConfig:
        try:
            return PoolConfig.from_metadata(dict(ref.scalerMetadata))
        except BadMetadata as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ScaledObject {ref.namespace}/{ref.name}: {exc}")
            raise  # abort raises; this line is for the type checker

    async def decision(self, cfg: PoolConfig, context: grpc.aio.ServicerContext | None = None) -> Decision:
        try:
            state = await self.source.state(cfg.pool, cfg.quantile, cfg.window_s, cfg.cooldown_s)
        except Exception as exc:  # noqa: BLE001 - any failure to read the gateways' numbers
            log.warning("pool %s: metrics unavailable: %s", cfg.pool, type(exc).__name__)
            if context is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"metrics for pool {cfg.pool} are unavailable")
            raise
        d = decide(cfg, state)
        if self.last.get(cfg.pool, d).need != d.need:
            log.info("pool %s: %d replicas wanted (%s; ttft p%g %s over %d requests; %d current)", cfg.pool, d.need,
                     d.reason, cfg.quantile * 100, "-" if d.ttft_quantile_s is None else f"{d.ttft_quantile_s:.3f}s",
                     d.requests, d.current)
        self.last[cfg.pool] = d
        return d

    @staticmethod
    def spec(cfg: PoolConfig) -> pb.GetMetricSpecResponse:
        return pb.GetMetricSpecResponse(metricSpecs=[pb.MetricSpec(
            metricName=cfg.metric_name, targetSize=round(cfg.slo_ms), targetSizeFloat=cfg.slo_ms)])

    async def IsActive(self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> pb.IsActiveResponse:
        cfg = await self._config(request, context)
        return pb.IsActiveResponse(result=(await self.decision(cfg, context)).active)

    async def StreamIsActive(self, request: pb.ScaledObjectRef,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.IsActiveResponse]:
        cfg = await self._config(request, context)
        previous: bool | None = None
        while True:
            try:
                state = await self.source.state(cfg.pool, cfg.quantile, cfg.window_s, cfg.cooldown_s)
                active: bool | None = is_active(cfg, state)
            except Exception as exc:  # noqa: BLE001 - a failed read pushes nothing; the next round retries
                log.warning("pool %s: metrics unavailable: %s", cfg.pool, type(exc).__name__)
                active = previous
            if active is not None and active != previous:
                yield pb.IsActiveResponse(result=active)
                previous = active
            await self.source.rounds.wait()

    async def GetMetricSpec(self, request: pb.ScaledObjectRef,
                            context: grpc.aio.ServicerContext) -> pb.GetMetricSpecResponse:
        return self.spec(await self._config(request, context))

    async def StreamMetricSpec(self, request: pb.ScaledObjectRef,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GetMetricSpecResponse]:
        yield self.spec(await self._config(request, context))
        await asyncio.Event().wait()  # open until KEDA closes it

    async def GetMetrics(self, request: pb.GetMetricsRequest,
                         context: grpc.aio.ServicerContext) -> pb.GetMetricsResponse:
        cfg = await self._config(request.scaledObjectRef, context)
        d = await self.decision(cfg, context)
        return pb.GetMetricsResponse(metricValues=[pb.MetricValue(
            metricName=request.metricName or cfg.metric_name, metricValue=round(d.value_ms),
            metricValueFloat=d.value_ms)])


async def serve(source: Source, address: str, *, credentials: grpc.ServerCredentials | None = None) -> grpc.aio.Server:
    """A started server on ``address`` (``host:port``; port 0 picks one: see ``server.port``)."""
    server = grpc.aio.server()
    pb_grpc.add_ExternalScalerServicer_to_server(ExternalScaler(source), server)
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    server.port = port  # type: ignore[attr-defined]
    await source.start()
    await server.start()
    return server
