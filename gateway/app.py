"""The composition root: builds the backend, the stores, tenancy, the cache, the serving path
and the APIs from settings, and starts and stops them with the app's lifespan. Only the
process runner (``server``) imports this module."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware

from adapters.base_model import BaseModelSpec
from adapters.errors import InvalidAdapter
from adapters.lora import LoraConfig
from adapters.peft import read_peft_dir, validate_adapter
from cache import AdapterCache
from cache.tssp import TsspSource

from .api.admin import AdminApi
from .api.callers import Callers
from .api.exceptions import exception_handlers
from .api.fleet import FleetApi
from .api.metrics import CacheCollector, FleetCollector, Metrics, StoreCollector
from .api.middleware import GatewayMiddleware
from .api.openai import OpenAiApi
from .api.operations import OperationsApi
from .api.routes import routes
from .api.tenant import TenantApi
from .backends import Backend, default_pool, static_backends
from .periodic import Periodic
from .serving.auto import AutoSelector
from .serving.breaker import Breaker
from .serving.completions import CompletionService
from .serving.discovery import PoolDiscovery, Resolver, resolve_host
from .serving.fleet import Fleet
from .serving.hold import HoldLimits
from .serving.names import ModelNames
from .serving.tokenizing import TokenizerService
from .settings import PoolSettings, Settings, SettingsError
from .store import StoreUnavailable, open_store
from .store.health import StoreHealth
from .store.outage import redis_client
from .tenancy.auth import Authenticator
from .tenancy.blobs import BlobStore
from .tenancy.bootstrap import Bootstrapped, ensure_admin_key, ensure_default_tenant_key, ensure_demo
from .tenancy.keyprovider import PROVIDERS
from .tenancy.packages import StoredPackages
from .tenancy.quotas import InProcessQuotas, Quotas, RedisQuotas
from .tenancy.service import Tenancy
from .tenancy.usage import UsageRecorder

if TYPE_CHECKING:
    from .tenancy.oidc import OidcVerifier

log = logging.getLogger("tensafe.gateway")

def load_local_adapters(spec: str) -> list[tuple[str, Path]]:
    """``name=PEFT_DIR,name2=PEFT_DIR2`` -> pairs (operator-provided development adapters)."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SettingsError("adapters", f"expected name=PEFT_DIR, got {item!r}")
        out.append((name.strip(), Path(path.strip()).expanduser()))
    return out


class Gateway:
    """Holds what the routes need; built from settings, started and stopped by the lifespan."""

    def __init__(self, settings: Settings, backend: Backend | None = None, resolver: Resolver = resolve_host) -> None:
        """``backend``: the one backend of pool ``default`` (tests and benchmarks hand one in);
        otherwise the pools of the settings supply them."""
        self.settings = settings
        pools = (default_pool(settings),) if backend is not None or not settings.pools else settings.pools
        self.pool_settings = pools
        #: the static pools' backends, made now (started with the gateway); DNS pools find theirs
        self._static = {p.name: [backend] if backend is not None else static_backends(p, settings)
                        for p in pools if p.discovery == "static"}
        if settings.queue_policy not in ("fair", "fcfs"):
            raise SettingsError("queue_policy", f"{settings.queue_policy!r} is not fair or fcfs")
        for name in ("hold_max_requests", "hold_timeout_s", "warm_adapters", "warm_timeout_s"):
            if getattr(settings, name) < 0:
                raise SettingsError(name, "must be at least 0")
        self.fleet = Fleet(policy=settings.dispatch, refresh_s=settings.fleet_refresh_s, queue_limit=settings.max_queue,
                           breaker=lambda: Breaker(settings.breaker_failures, settings.breaker_cooldown_s),
                           health_timeout_s=settings.health_timeout_s, fair=settings.queue_policy == "fair",
                           output_weight=settings.fair_output_weight, holds={p.name: hold_limits(p, settings)
                                                                             for p in pools})
        self.discovery = [PoolDiscovery(p, settings, self.fleet, joining=self._joining, resolver=resolver,
                                        backends=self._static.get(p.name)) for p in pools]
        self._fleet_checks = Periodic("fleet-health", settings.health_interval_s, self._check_fleet)
        self.store = open_store(settings.resolved_store_url(), settings.store_timeout_s)
        self.keys = PROVIDERS[settings.key_provider](settings.data_dir)
        self.oidc = _oidc(settings)
        self.auth = Authenticator(self.store, self.keys.hashing_key(), admin_key=settings.admin_key, oidc=self.oidc,
                                  cache_ttl_s=settings.registry_cache_ttl_s)
        self.blobs = BlobStore(settings.data_dir / "blobs")
        self.names = ModelNames(settings.model_name, int(time.time()), self.store,
                                cache_ttl_s=settings.registry_cache_ttl_s)
        self.usage = UsageRecorder(self.store)
        # a process that runs the engine keeps its torch parallelism on the step thread alone
        self._engine_backend = next((b for backends in self._static.values() for b in backends
                                     if hasattr(b, "confine_helper_thread")), None)
        self.auto = AutoSelector(self.store, thread_initializer=getattr(self._engine_backend,
                                                                        "confine_helper_thread", None))
        self.callers = Callers(self.auth)
        self._quota_redis = (redis_client(settings.quota_redis_url, settings.store_timeout_s)
                             if settings.quota_redis_url else None)
        self.quotas: Quotas = RedisQuotas(self._quota_redis) if self._quota_redis is not None else InProcessQuotas()
        checks = {"registry": self.store.ping}
        if self._quota_redis is not None:
            checks["quotas"] = self.quotas.ping
        self.store_health = StoreHealth(checks)
        self.cache: AdapterCache | None = None  # made once the backend has said what model it serves
        self.metrics = Metrics(top_tenants=settings.metrics_top_tenants)
        self.metrics.add_collector(CacheCollector(lambda: self.cache.stats() if self.cache is not None else None))
        self.metrics.add_collector(FleetCollector(
            lambda: list(self.fleet.members.values()), held=lambda: self.fleet.holds.held,
            starting=lambda: {d.pool.name: len(d.pending) for d in self.discovery}))
        self.metrics.add_collector(StoreCollector(self.store_health))
        self.tenancy: Tenancy | None = None
        self.completions: CompletionService | None = None
        # the APIs the routes call (api.routes); the last three exist once started
        self.operations = OperationsApi(self.callers, self.fleet, self.store_health, self.metrics,
                                        settings.model_name, lambda: self.ready)
        self.openai: OpenAiApi | None = None
        self.tenant_api: TenantApi | None = None
        self.admin_api: AdminApi | None = None
        self.fleet_api: FleetApi | None = None
        self.boot: Bootstrapped | None = None
        self._sweeper = Periodic("blob-sweep", max(settings.orphan_grace_s, 60.0), self._sweep_logged)
        self.ready = False
        self._base: BaseModelSpec | None = None
        self._source: TsspSource | None = None  # the cache's package opener, once started
        self._described = False
        self._local: list[tuple[str, LoraConfig, dict]] = []

    async def start(self) -> None:
        s = self.settings
        if self._engine_backend is not None:  # before the loop's executor first runs anything
            self._engine_backend.confine_executor(asyncio.get_running_loop())
        await self.store.init()
        self._local = await asyncio.to_thread(self._read_local_adapters)
        source = self._source = TsspSource(StoredPackages(self.store, self.blobs),
                                           lambda: [k.private for k in self.keys.recipient_keys()], self._base)
        self.cache = AdapterCache(source, cpu_budget_bytes=s.cpu_cache_mb << 20, tenant_share=s.tenant_cache_share)
        self.fleet.cache = self.cache
        self.cache.on_load = self._adapter_loaded
        self.fleet.on_wait, self.fleet.on_service = self.metrics.waited, self.metrics.served
        self.fleet.on_leave = self.metrics.forget_backend
        for discovery in self.discovery:
            await discovery.start()
        base = source.base_model = self._base
        self.tenancy = Tenancy(self.store, self.auth, self.keys, self.blobs, self.cache, base, self.names.reserved(),
                               on_change=self._registry_changed, usage=self.usage)
        self.completions = CompletionService(self.fleet, self.names, max_body_bytes=s.max_body_bytes,
                                             request_timeout_s=s.request_timeout_s, retry_after_s=s.retry_after_s,
                                             cache=self.cache, quotas=self.quotas, usage=self.usage, auto=self.auto)
        self.openai = OpenAiApi(self.callers, self.names, self.completions, TokenizerService(
            self.fleet, self.names, max_body_bytes=s.max_body_bytes, retry_after_s=s.retry_after_s))
        self.tenant_api = TenantApi(self.tenancy, self.callers, self.usage, self.auto,
                                    max_upload_bytes=s.max_upload_bytes, max_body_bytes=s.max_body_bytes)
        self.admin_api = AdminApi(self.tenancy, self.callers, self.usage, self.cache,
                                  max_body_bytes=s.max_body_bytes)
        self.fleet_api = FleetApi(self.callers, self.fleet, self.store, self.tenancy.audit)
        self.boot = await self._bootstrap()
        await self.sweep_blobs()
        self.fleet.set_drained((await self.store.drained()).keys())
        self._fleet_checks.start()
        self._sweeper.start()
        self.usage.start()
        self.store_health.start()
        self.ready = True

    async def sweep_blobs(self) -> None:
        assert self.tenancy is not None
        removed = await self.tenancy.sweep_blobs(self.settings.orphan_grace_s)
        if removed:
            log.warning("removed %d file(s) a crash left in the blob store: %s", len(removed), ", ".join(removed))

    async def _sweep_logged(self) -> None:
        try:
            await self.sweep_blobs()
        except StoreUnavailable as exc:
            log.warning("blob sweep postponed: %s", exc)

    def _registry_changed(self) -> None:
        """A key was revoked, a tenant changed or went, or an adapter was deleted: what the
        request path remembers from the registry is dropped, so the change applies at once."""
        self.auth.forget()
        self.names.forget()

    def _read_local_adapters(self) -> list[tuple[str, LoraConfig, dict]]:
        """The operator's development adapters (``adapters``), read like uploads (checked
        against the base model when the first backend joins): a PEFT feature the backends
        would serve wrongly (DoRA, modules_to_save, rank_pattern, ...) stops the start."""
        out = []
        for name, path in load_local_adapters(self.settings.adapters):
            try:
                config, tensors = read_peft_dir(path)
            except InvalidAdapter as exc:
                raise SettingsError("adapters", f"{name}={path}: {exc.problem}") from None
            out.append((name, config, tensors))
        return out

    async def _joining(self, pool: str, backend: Backend) -> None:
        """A started backend is about to take requests in ``pool``: the first one tells the base
        model the gateway serves (uploads are checked against it); every one gets the
        development adapters, then the pool's hottest adapters (``_warm``)."""
        if self._base is None and not self._described:
            config = await backend.model_config()
            self._described = True
            self._base = BaseModelSpec.from_hf_config(self.settings.model_name, config) if config is not None else None
            # a pool at zero when the gateway started: uploads and opens learn it now
            if self._source is not None:
                self._source.base_model = self._base
            if self.tenancy is not None:
                self.tenancy.base_model = self._base
            for name, lora, tensors in self._local:
                try:
                    validate_adapter(lora, tensors, self._base)
                except InvalidAdapter as exc:
                    raise SettingsError("adapters", f"{name}: {exc.problem}") from None
                self.names.add_local(name, f"local:{name}", int(time.time()), rank=lora.rank)
        for name, lora, tensors in self._local:
            await backend.load_adapter(f"local:{name}", tensors, lora)
            log.info("adapter %s loaded on %s (rank %d, %s)", name, backend.name, lora.rank,
                     ",".join(lora.target_modules))
        await self._warm(pool, backend)

    async def _warm(self, pool: str, backend: Backend) -> None:
        """Load the pool's hottest adapters into a joining backend (``warm_adapters`` at most,
        within ``warm_timeout_s``), so its first requests find them resident; a warm-up that
        fails or takes too long is logged, and the backend joins with what it has (loads still
        under way finish in the background)."""
        s = self.settings
        if not s.warm_adapters or not s.warm_timeout_s:
            return
        t0 = time.perf_counter()
        try:
            loaded = await asyncio.wait_for(self.fleet.warm(pool, backend, s.warm_adapters), s.warm_timeout_s)
        except TimeoutError:
            log.warning("backend %s/%s: warm-up did not finish within %g s; it joins without it", pool, backend.name,
                        s.warm_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failed warm-up never keeps a backend out
            log.warning("backend %s/%s: warm-up failed (%s); it joins without it", pool, backend.name, exc)
        else:
            if loaded:
                log.info("backend %s/%s warmed with %d adapter(s) in %.3f s: %s", pool, backend.name, len(loaded),
                         time.perf_counter() - t0, ", ".join(loaded))

    def _adapter_loaded(self, backend: str, tier: str, seconds: float) -> None:
        self.metrics.adapter_loaded(self.fleet.pool_of(backend), backend, tier, seconds)

    async def _check_fleet(self) -> None:
        await self.fleet.check()
        try:
            self.fleet.set_drained((await self.store.drained()).keys())
        except StoreUnavailable as exc:
            log.warning("drain state not refreshed: %s", exc)

    @property
    def backend(self) -> Backend:
        """The first backend (the only one without pools)."""
        for backends in self._static.values():
            return backends[0]
        return next(iter(self.fleet.members.values())).backend

    async def _bootstrap(self) -> Bootstrapped:
        s = self.settings
        assert self.tenancy is not None
        admin_file = None
        if s.admin_key is None:
            _, admin_file = await ensure_admin_key(self.tenancy, s.data_dir)
        if s.api_key:
            await ensure_default_tenant_key(self.tenancy, s.api_key)
        if s.dev and s.demo:
            key, key_file, names = await ensure_demo(self.tenancy, s.data_dir, s.model_name)
            return Bootstrapped(admin_file, key, key_file, names)
        return Bootstrapped(admin_file)

    async def stop(self) -> None:
        self.ready = False
        await self._sweeper.stop()
        await self._fleet_checks.stop()
        for discovery in self.discovery:
            await discovery.stop()
        await self.store_health.stop()
        await self.usage.stop()
        await self.auto.close()
        if self.cache is not None:
            await self.cache.close()
        await self.fleet.close()
        await self.quotas.close()
        if self._quota_redis is not None:
            await self._quota_redis.aclose()
        if self.oidc is not None:
            await self.oidc.close()
        await self.store.close()


def hold_limits(pool: PoolSettings, settings: Settings) -> HoldLimits:
    """How many requests ``pool`` holds while none of its backends is ready, and how long:
    its own settings, else the gateway's."""
    return HoldLimits(
        max_requests=settings.hold_max_requests if pool.hold_max_requests is None else pool.hold_max_requests,
        timeout_s=settings.hold_timeout_s if pool.hold_timeout_s is None else pool.hold_timeout_s)


def _oidc(settings: Settings) -> "OidcVerifier | None":
    if not (settings.oidc_issuer and settings.oidc_audience and (settings.oidc_jwks_url or settings.oidc_jwks_file)):
        return None
    from .tenancy.oidc import OidcConfig, OidcVerifier

    return OidcVerifier(OidcConfig(issuer=settings.oidc_issuer, audience=settings.oidc_audience,
                                   jwks_url=settings.oidc_jwks_url or None, jwks_file=settings.oidc_jwks_file or None,
                                   tenant_claim=settings.oidc_tenant_claim))


def create_app(settings: Settings, backend: Backend | None = None,
               on_ready: Callable[[Gateway], None] | None = None,
               on_stopped: Callable[[], None] | None = None, resolver: Resolver = resolve_host) -> Starlette:
    """The ASGI app. ``backend`` defaults to the one named in settings; ``on_ready`` runs once
    the model is loaded and the bootstrap is done (the development banner), ``on_stopped``
    once everything is shut down (the last log records are flushed); ``resolver`` is what DNS
    discovery asks (the system's resolver)."""
    gateway = Gateway(settings, backend, resolver)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        if on_ready is not None:
            on_ready(gateway)
        try:
            yield
        finally:
            try:
                await gateway.stop()
            finally:
                if on_stopped is not None:
                    on_stopped()

    app = Starlette(
        routes=routes(gateway), lifespan=lifespan,
        middleware=[Middleware(GatewayMiddleware, access_log_enabled=settings.access_log,
                               observe=gateway.metrics.observe)],
        exception_handlers=exception_handlers(lambda exc: gateway.store_health.mark_down(exc.store, exc.reason),
                                              settings.retry_after_s),
    )
    app.state.gateway = gateway
    return app
