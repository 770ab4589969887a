"""The composition root: builds the backend, the model table, auth and the routes, and maps
every error to OpenAI's shape in one place. Nothing imports this module."""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.base_model import BaseModelSpec
from cache import AdapterCache
from cache.tssp import TsspSource

from . import errors
from .api.admin import AdminApi
from .api.jsonresponse import JSONResponse
from .api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .api.metrics import BackendCollector, CacheCollector, Metrics, StoreCollector
from .api.middleware import GatewayMiddleware
from .api.tenant import TenantApi
from .backends import Backend, LoraConfig, create_backend
from .periodic import Periodic
from .protocol import responses as wire
from .serving.auto import AutoRouter
from .serving.completions import Completions
from .serving.names import ModelTable
from .serving.slots import BackendSlots
from .settings import Settings
from .store import StoreUnavailable, open_store
from .store.health import StoreHealth
from .store.outage import redis_client
from .tenancy.auth import Authenticator, Principal
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

_HTTP_ERRORS: dict[int, type[errors.ApiError]] = {404: errors.NotFound, 405: errors.MethodNotAllowed,
                                                 413: errors.PayloadTooLarge}


def _error_response(exc: errors.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ApiError)
    request.state.error_code = exc.code
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = _HTTP_ERRORS.get(exc.status_code, errors.InvalidRequest)
    message = {404: f"Unknown request URL: {request.method} {request.url.path[:200]}.",
               405: f"Method {request.method} is not allowed on {request.url.path[:200]}."}.get(
        exc.status_code, str(exc.detail))
    error = kind(message)
    error.status = exc.status_code
    response = _error_response(error)
    response.headers.update(exc.headers or {})
    return response


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StoreUnavailable)
    gateway: Gateway = request.app.state.gateway
    gateway.store_health.mark_down(exc.store, exc.reason)
    return await _api_error(request, errors.Overloaded(
        f"The gateway's {exc.store} store is unavailable; retry shortly.", code="store_unavailable",
        retry_after=gateway.settings.retry_after_s))


def load_local_adapters(spec: str) -> list[tuple[str, Path]]:
    """``name=PEFT_DIR,name2=PEFT_DIR2`` -> pairs (operator-provided development adapters)."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"adapters: expected name=PEFT_DIR, got {item!r}")
        out.append((name.strip(), Path(path.strip()).expanduser()))
    return out


class Gateway:
    """Holds what the routes need; built from settings, started and stopped by the lifespan."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.store = open_store(settings.resolved_store_url(), settings.store_timeout_s)
        self.keys = PROVIDERS[settings.key_provider](settings.data_dir)
        self.oidc = _oidc(settings)
        self.auth = Authenticator(self.store, self.keys.hashing_key(), admin_key=settings.admin_key, oidc=self.oidc,
                                  cache_ttl_s=settings.registry_cache_ttl_s)
        self.blobs = BlobStore(settings.data_dir / "blobs")
        self.models = ModelTable(settings.model_name, int(time.time()), self.store,
                                 cache_ttl_s=settings.registry_cache_ttl_s)
        self.usage = UsageRecorder(self.store)
        self.auto = AutoRouter(self.store)
        self._quota_redis = (redis_client(settings.quota_redis_url, settings.store_timeout_s)
                             if settings.quota_redis_url else None)
        self.quotas: Quotas = RedisQuotas(self._quota_redis) if self._quota_redis is not None else InProcessQuotas()
        checks = {"registry": self.store.ping}
        if self._quota_redis is not None:
            checks["quotas"] = self.quotas.ping
        self.store_health = StoreHealth(checks)
        self.cache: AdapterCache | None = None
        self.tenancy: Tenancy | None = None
        self.completions: Completions | None = None
        self.tenant_api: TenantApi | None = None
        self.admin_api: AdminApi | None = None
        self.boot: Bootstrapped | None = None
        self._sweeper = Periodic("blob-sweep", max(settings.orphan_grace_s, 60.0), self._sweep_logged)
        self.metrics = Metrics()
        self.metrics.add_collector(CacheCollector(lambda: self.cache.stats() if self.cache is not None else None))
        self.metrics.add_collector(BackendCollector(backend))
        self.metrics.add_collector(StoreCollector(self.store_health))
        self.ready = False

    async def start(self) -> None:
        s = self.settings
        await self.store.init()
        await self.backend.start()
        config = await self.backend.model_config()
        base = BaseModelSpec.from_hf_config(s.model_name, config) if config is not None else None
        if s.adapters:
            await self._load_local_adapters()
        source = TsspSource(StoredPackages(self.store, self.blobs),
                            lambda: [k.private for k in self.keys.recipient_keys()], base)
        slots = BackendSlots(self.backend)
        self.cache = AdapterCache(source, cpu_budget_bytes=s.cpu_cache_mb << 20, tenant_share=s.tenant_cache_share,
                                  prepare=slots.prepare)
        self.cache.add_backend(self.backend.name, slots)
        self.tenancy = Tenancy(self.store, self.auth, self.keys, self.blobs, self.cache, base, self.models.reserved(),
                               on_change=self._registry_changed, usage=self.usage)
        self.completions = Completions(self.backend, self.models, max_body_bytes=s.max_body_bytes,
                                       request_timeout_s=s.request_timeout_s, retry_after_s=s.retry_after_s,
                                       cache=self.cache, quotas=self.quotas, usage=self.usage, auto=self.auto)
        self.tenant_api = TenantApi(self.tenancy, self.principal_of, self.usage, self.auto,
                                    max_upload_bytes=s.max_upload_bytes, max_body_bytes=s.max_body_bytes)
        self.admin_api = AdminApi(self.tenancy, self.principal_of, self.usage, self.cache,
                                  max_body_bytes=s.max_body_bytes)
        self.boot = await self._bootstrap()
        await self.sweep_blobs()
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
        self.models.forget()

    async def _load_local_adapters(self) -> None:
        from engine.peft_dir import load_peft_dir  # reads PEFT directories into plain tensors

        for name, path in load_local_adapters(self.settings.adapters):
            config, tensors = load_peft_dir(path)
            adapter_id = f"local:{name}"
            await self.backend.load_adapter(adapter_id, tensors, LoraConfig(
                config.rank, config.alpha, config.target_modules, config.use_rslora))
            self.models.add_local(name, adapter_id, int(time.time()))
            log.info("adapter %s loaded (rank %d, %s)", name, config.rank, ",".join(config.target_modules))

    async def _bootstrap(self) -> Bootstrapped:
        s = self.settings
        assert self.tenancy is not None
        admin_file = None
        if s.admin_key is None:
            _, admin_file = await ensure_admin_key(self.tenancy, s.data_dir)
        if s.api_key:
            await ensure_default_tenant_key(self.tenancy, s.api_key)
        if s.dev and s.demo:
            key, key_file, names = await ensure_demo(self.tenancy, s.data_dir)
            return Bootstrapped(admin_file, key, key_file, names)
        return Bootstrapped(admin_file)

    async def stop(self) -> None:
        self.ready = False
        await self._sweeper.stop()
        await self.store_health.stop()
        await self.usage.stop()
        await self.auto.close()
        if self.cache is not None:
            await self.cache.close()
        await self.backend.close()
        await self.quotas.close()
        if self._quota_redis is not None:
            await self._quota_redis.aclose()
        if self.oidc is not None:
            await self.oidc.close()
        await self.store.close()

    async def principal_of(self, request: Request) -> Principal:
        principal = await self.auth.authenticate(request.headers.get("authorization"))
        request.state.tenant = principal.tenant
        return principal

    async def principal(self, request: Request) -> Principal:
        """A caller of the model endpoints (scope ``tenant``)."""
        principal = await self.principal_of(request)
        principal.require("tenant")
        return principal

    async def health(self, request: Request) -> Response:
        """Alive: always 200 while the process serves; the stores' last known state beside it."""
        return JSONResponse({"status": "ok" if self.store_health.ok else "degraded",
                             "stores": self.store_health.view()})

    async def ready_check(self, request: Request) -> Response:
        health = await self.backend.health()
        if self.ready and health.ok:
            return JSONResponse({"status": "ready", "model": self.settings.model_name})
        return JSONResponse({"status": "starting", "detail": health.detail}, status_code=503)

    async def metrics_endpoint(self, request: Request) -> Response:
        principal = await self.principal_of(request)
        if not principal.is_admin:
            raise errors.PermissionDenied("Metrics need an admin credential.", code="admin_required")
        return Response(self.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def list_models(self, request: Request) -> Response:
        principal = await self.principal(request)
        cards = [wire.model_card(r.model, r.created, r.owned_by) for r in await self.models.visible(principal)]
        return JSONResponse(wire.model_list(cards))

    async def get_model(self, request: Request) -> Response:
        principal = await self.principal(request)
        route = await self.models.resolve(request.path_params["model"], principal)
        return JSONResponse(wire.model_card(route.model, route.created, route.owned_by))

    async def chat(self, request: Request) -> Response:
        principal = await self.principal(request)
        assert self.completions is not None
        return await self.completions.chat(request, principal)

    async def text(self, request: Request) -> Response:
        principal = await self.principal(request)
        assert self.completions is not None
        return await self.completions.completions(request, principal)

    def routes(self) -> list[Route]:
        def late(api: str, method: str):
            async def endpoint(request: Request) -> Response:
                return await getattr(getattr(self, api), method)(request)
            return endpoint

        t, a = functools.partial(late, "tenant_api"), functools.partial(late, "admin_api")
        return [  # matched in order: the hot routes first
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.text, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready_check, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/v1/adapters", t("upload"), methods=["POST"]),
            Route("/v1/adapters", t("list_adapters"), methods=["GET"]),
            Route("/v1/adapters/{name}", t("get_adapter"), methods=["GET"]),
            Route("/v1/adapters/{name}", t("delete_adapter"), methods=["DELETE"]),
            Route("/v1/tssp/recipient", t("recipient_keys"), methods=["GET"]),
            Route("/v1/usage", t("get_usage"), methods=["GET"]),
            Route("/v1/experts", t("get_experts"), methods=["GET"]),
            Route("/v1/experts", t("put_experts"), methods=["PUT"]),
            Route("/v1/route", t("route"), methods=["POST"]),
            Route("/v1/keys", t("list_keys"), methods=["GET"]),
            Route("/v1/keys", t("create_key"), methods=["POST"]),
            Route("/v1/keys/{key_id}", t("revoke_key"), methods=["DELETE"]),
            Route("/v1/signing-keys", t("list_signing_keys"), methods=["GET"]),
            Route("/v1/signing-keys", t("add_signing_key"), methods=["POST"]),
            Route("/v1/signing-keys/{key_id}", t("revoke_signing_key"), methods=["DELETE"]),
            Route("/admin/tenants", a("create_tenant"), methods=["POST"]),
            Route("/admin/tenants", a("list_tenants"), methods=["GET"]),
            Route("/admin/tenants/{tenant}", a("get_tenant"), methods=["GET"]),
            Route("/admin/tenants/{tenant}", a("update_tenant"), methods=["PATCH"]),
            Route("/admin/tenants/{tenant}", a("delete_tenant"), methods=["DELETE"]),
            Route("/admin/tenants/{tenant}/keys", a("create_key"), methods=["POST"]),
            Route("/admin/tenants/{tenant}/keys", a("list_keys"), methods=["GET"]),
            Route("/admin/keys/{key_id}", a("revoke_key"), methods=["DELETE"]),
            Route("/admin/tenants/{tenant}/signing-keys", a("add_signing_key"), methods=["POST"]),
            Route("/admin/tenants/{tenant}/signing-keys", a("list_signing_keys"), methods=["GET"]),
            Route("/admin/tenants/{tenant}/signing-keys/{key_id}", a("revoke_signing_key"), methods=["DELETE"]),
            Route("/admin/tenants/{tenant}/usage", a("tenant_usage"), methods=["GET"]),
            Route("/admin/tenants/{tenant}/adapters/{name}", a("delete_adapter"), methods=["DELETE"]),
            Route("/admin/adapters", a("list_adapters"), methods=["GET"]),
            Route("/admin/audit", a("audit"), methods=["GET"]),
            Route("/admin/audit/verify", a("audit_verify"), methods=["GET"]),
            Route("/admin/cache", a("cache_stats"), methods=["GET"]),
            Route("/admin/cache/{tenant}/{name}/{action}", a("cache_action"), methods=["POST"]),
        ]


def _oidc(settings: Settings) -> "OidcVerifier | None":
    if not (settings.oidc_issuer and settings.oidc_audience and (settings.oidc_jwks_url or settings.oidc_jwks_file)):
        return None
    from .tenancy.oidc import OidcConfig, OidcVerifier

    return OidcVerifier(OidcConfig(issuer=settings.oidc_issuer, audience=settings.oidc_audience,
                                   jwks_url=settings.oidc_jwks_url or None, jwks_file=settings.oidc_jwks_file or None,
                                   tenant_claim=settings.oidc_tenant_claim))


def create_app(settings: Settings, backend: Backend | None = None,
               on_ready: Callable[[Gateway], None] | None = None,
               on_stopped: Callable[[], None] | None = None) -> Starlette:
    """The ASGI app. ``backend`` defaults to the one named in settings; ``on_ready`` runs once
    the model is loaded and the bootstrap is done (the development banner), ``on_stopped``
    once everything is shut down (the last log records are flushed)."""
    gateway = Gateway(settings, backend or create_backend(settings))

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
        routes=gateway.routes(), lifespan=lifespan,
        middleware=[Middleware(GatewayMiddleware, access_log_enabled=settings.access_log,
                               observe=gateway.metrics.observe)],
        exception_handlers={errors.ApiError: _api_error, HTTPException: _http_error,
                            StoreUnavailable: _store_unavailable},
    )
    app.state.gateway = gateway
    return app
