"""The operator API under /admin (``admin`` scope only): tenants, their keys, signing keys,
quotas, usage and adapters, the cache, and the audit log."""
from __future__ import annotations

import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from cache import AdapterCache, CacheError

from .. import errors
from ..store import verify_store
from ..tenancy.quotas import QuotaLimits
from ..tenancy.service import Tenancy
from ..tenancy.usage import UsageRecorder
from .bodies import read_object, scopes_field
from .callers import Callers
from .jsonresponse import JSONResponse
from .views import (
    adapter_view,
    audit_view,
    int_query,
    key_view,
    page,
    page_params,
    signing_key_view,
    tenant_view,
    usage_view,
)

MAX_SEQ = 2**63 - 1  # audit sequence numbers are signed 64-bit in every store


def _quotas(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        return QuotaLimits.from_dict(value).to_dict()
    except (ValueError, TypeError) as exc:
        raise errors.InvalidRequest(f"Invalid 'quotas': {exc}", param="quotas", code="invalid_value") from None


class AdminApi:
    def __init__(self, tenancy: Tenancy, callers: Callers, usage: UsageRecorder,
                 cache: AdapterCache | None, *, max_body_bytes: int) -> None:
        self.tenancy = tenancy
        self.callers = callers
        self.usage = usage
        self.cache = cache
        self.max_body_bytes = max_body_bytes

    async def _admin(self, request: Request) -> str:
        return (await self.callers.admin(request)).subject

    async def _json(self, request: Request) -> dict[str, Any]:
        return await read_object(request, self.max_body_bytes)

    # tenants ----------------------------------------------------------------------------------
    async def create_tenant(self, request: Request) -> Response:
        actor = await self._admin(request)
        body = await self._json(request)
        tenant_id, name = body.get("id"), body.get("name", "")
        if not isinstance(tenant_id, str):
            raise errors.InvalidRequest("Missing required parameter: 'id' (a string).", param="id",
                                        code="missing_required_parameter")
        if not isinstance(name, str):
            raise errors.InvalidRequest("Invalid 'name': expected a string.", param="name", code="invalid_type")
        tenant = await self.tenancy.create_tenant(actor, tenant_id, name, _quotas(body.get("quotas")))
        return JSONResponse(tenant_view(tenant), status_code=201)

    async def list_tenants(self, request: Request) -> Response:
        await self._admin(request)
        limit, after = page_params(request)
        items = await self.tenancy.store.list_tenants(limit + 1, after)
        return JSONResponse(page(items, limit, tenant_view, lambda t: t.id))

    async def get_tenant(self, request: Request) -> Response:
        await self._admin(request)
        return JSONResponse(tenant_view(await self.tenancy.tenant(request.path_params["tenant"])))

    async def update_tenant(self, request: Request) -> Response:
        actor = await self._admin(request)
        body = await self._json(request)
        suspended = body.get("suspended")
        if suspended is not None and not isinstance(suspended, bool):
            raise errors.InvalidRequest("Invalid 'suspended': expected a boolean.", param="suspended",
                                        code="invalid_type")
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise errors.InvalidRequest("Invalid 'name': expected a string.", param="name", code="invalid_type")
        quotas = _quotas(body["quotas"]) if "quotas" in body else None
        tenant = await self.tenancy.update_tenant(actor, request.path_params["tenant"], name=name,
                                                  suspended=suspended, quotas=quotas)
        return JSONResponse(tenant_view(tenant))

    async def delete_tenant(self, request: Request) -> Response:
        actor = await self._admin(request)
        tenant = request.path_params["tenant"]
        await self.tenancy.delete_tenant(actor, tenant)
        return JSONResponse({"id": tenant, "object": "tenant", "deleted": True})

    # keys ---------------------------------------------------------------------------------------
    async def create_key(self, request: Request) -> Response:
        actor = await self._admin(request)
        body = await self._json(request)
        scopes = scopes_field(body)
        name = body.get("name", "")
        if not isinstance(name, str):
            raise errors.InvalidRequest("Invalid 'name': expected a string.", param="name", code="invalid_type")
        key, record = await self.tenancy.issue_key(actor, request.path_params["tenant"], scopes, name)
        return JSONResponse({**key_view(record), "key": key}, status_code=201)

    async def create_operator_key(self, request: Request) -> Response:
        """A key of no tenant: ``admin``, or ``metrics`` (reads /metrics and nothing else: what
        a Prometheus scraper should hold)."""
        actor = await self._admin(request)
        body = await self._json(request)
        name = body.get("name", "")
        if not isinstance(name, str):
            raise errors.InvalidRequest("Invalid 'name': expected a string.", param="name", code="invalid_type")
        key, record = await self.tenancy.issue_key(actor, None, scopes_field(body, default="metrics"), name)
        return JSONResponse({**key_view(record), "key": key}, status_code=201)

    async def list_operator_keys(self, request: Request) -> Response:
        await self._admin(request)
        limit, after = page_params(request)
        items = await self.tenancy.store.list_api_keys(None, limit + 1, after)
        return JSONResponse(page(items, limit, key_view, lambda k: k.id))

    async def list_keys(self, request: Request) -> Response:
        await self._admin(request)
        tenant = await self.tenancy.tenant(request.path_params["tenant"])
        limit, after = page_params(request)
        items = await self.tenancy.store.list_api_keys(tenant.id, limit + 1, after)
        return JSONResponse(page(items, limit, key_view, lambda k: k.id))

    async def revoke_key(self, request: Request) -> Response:
        actor = await self._admin(request)
        return JSONResponse(key_view(await self.tenancy.revoke_key(actor, request.path_params["key_id"])))

    async def add_signing_key(self, request: Request) -> Response:
        actor = await self._admin(request)
        record = await self.tenancy.register_signing_key(actor, request.path_params["tenant"],
                                                         await self._json(request))
        return JSONResponse(signing_key_view(record), status_code=201)

    async def list_signing_keys(self, request: Request) -> Response:
        await self._admin(request)
        tenant = await self.tenancy.tenant(request.path_params["tenant"])
        keys = await self.tenancy.store.list_signing_keys(tenant.id, include_revoked=True)
        return JSONResponse({"object": "list", "data": [signing_key_view(k) for k in keys], "has_more": False})

    async def revoke_signing_key(self, request: Request) -> Response:
        actor = await self._admin(request)
        record = await self.tenancy.revoke_signing_key(actor, request.path_params["tenant"],
                                                       request.path_params["key_id"])
        return JSONResponse(signing_key_view(record))

    # usage, adapters, audit -----------------------------------------------------------------------
    async def tenant_usage(self, request: Request) -> Response:
        await self._admin(request)
        tenant = await self.tenancy.tenant(request.path_params["tenant"])
        await self.usage.flush()
        return JSONResponse(usage_view(await self.tenancy.store.usage(tenant.id, request.query_params.get("since"))))

    async def list_adapters(self, request: Request) -> Response:
        await self._admin(request)
        limit, after = page_params(request)
        tenant = request.query_params.get("tenant")
        items = await self.tenancy.store.list_adapters(tenant, limit + 1, after)
        return JSONResponse(page(items, limit, adapter_view, lambda a: a.name if tenant else f"{a.tenant}/{a.name}"))

    async def delete_adapter(self, request: Request) -> Response:
        actor = await self._admin(request)
        record = await self.tenancy.delete_adapter(actor, request.path_params["tenant"], request.path_params["name"])
        return JSONResponse({"id": record.name, "tenant": record.tenant, "object": "adapter", "deleted": True})

    async def audit(self, request: Request) -> Response:
        await self._admin(request)
        limit, _ = page_params(request, default=100)
        after_seq = int_query(request, "after", 0, 0, MAX_SEQ) if request.query_params.get("after") else 0
        items = await self.tenancy.store.list_audit(after_seq, limit + 1)
        return JSONResponse(page(items, limit, audit_view, lambda e: str(e.seq)))

    async def audit_verify(self, request: Request) -> Response:
        await self._admin(request)
        count, problems, head = await verify_store(self.tenancy.store)
        return JSONResponse({"entries": count, "intact": not problems, "problems": problems,
                             "head": dataclasses.asdict(head) if head is not None else None})

    # cache ---------------------------------------------------------------------------------------
    async def cache_stats(self, request: Request) -> Response:
        await self._admin(request)
        if self.cache is None:
            return JSONResponse({"enabled": False})
        tenant = request.query_params.get("tenant")
        return JSONResponse({"enabled": True, **(self.cache.tenant_stats(tenant) if tenant else self.cache.stats())})

    async def cache_action(self, request: Request) -> Response:
        actor = await self._admin(request)
        if self.cache is None:
            raise errors.NotFound("The adapter cache is not enabled.", code="cache_disabled")
        record = await self.tenancy.adapter(request.path_params["tenant"], request.path_params["name"])
        action = request.path_params["action"]
        try:
            if action == "pin":
                await self.cache.pin(record.key)
            elif action == "unpin":
                self.cache.unpin(record.key)
            elif action == "evict":
                self.cache.evict(record.key)
            else:
                raise errors.NotFound(f"Unknown cache action '{action[:32]}'.", code="not_found")
        except CacheError as exc:
            raise errors.Conflict(f"Cannot {action} {record.name}: {exc}", code="cache_conflict") from None
        await self.tenancy.audit(actor, f"cache.{action}", f"{record.tenant}/{record.name}")
        status = self.cache.status(record.key)
        return JSONResponse({"id": record.name, "tenant": record.tenant, "state": status.state.value,
                             "tiers": [t.value for t in status.tiers], "pinned": status.pinned})
