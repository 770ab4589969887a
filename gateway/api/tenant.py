"""Tenant endpoints beside the OpenAI ones: adapter upload/list/delete, the gateway's recipient
keys, usage, and self-service keys and signing keys (``tenant-admin`` scope). A caller only
ever sees its own tenant: another tenant's adapter or key is a 404 exactly like a missing one."""
from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from adapters.keys import recipient_key_entry
from router import ExpertTable

from .. import errors
from ..protocol import parse_chat
from ..serving.auto import AUTO, AutoSelector, classified_text, decision_view
from ..tenancy.auth import Principal
from ..tenancy.service import Tenancy
from ..tenancy.usage import UsageRecorder
from .bodies import read_body, read_object, scopes_field
from .callers import Callers
from .jsonresponse import JSONResponse
from .views import adapter_view, key_view, page, page_params, signing_key_view, usage_view


def tenant_of(principal: Principal) -> str:
    if principal.tenant is None:
        raise errors.PermissionDenied("This endpoint needs a tenant credential; operators use /admin.",
                                      code="tenant_required")
    return principal.tenant


class TenantApi:
    def __init__(self, tenancy: Tenancy, callers: Callers, usage: UsageRecorder, auto: AutoSelector, *,
                 max_upload_bytes: int, max_body_bytes: int) -> None:
        self.auto = auto
        self.tenancy = tenancy
        self.callers = callers
        self.usage = usage
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_body_bytes

    async def _caller(self, request: Request, scope: str = "tenant") -> tuple[Principal, str]:
        principal = await self.callers.any(request)
        tenant = tenant_of(principal)
        principal.require(scope)
        return principal, tenant

    # adapters ------------------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        principal, tenant = await self._caller(request)
        quota = (await self.tenancy.tenant(tenant)).quotas.get("max_upload_bytes")
        limit = min(self.max_upload_bytes, quota) if quota is not None else self.max_upload_bytes
        data = await read_body(request, limit, "Upload")
        record = await self.tenancy.upload(principal.subject, tenant, data)
        return JSONResponse(adapter_view(record), status_code=201)

    async def list_adapters(self, request: Request) -> Response:
        _, tenant = await self._caller(request)
        limit, after = page_params(request)
        items = await self.tenancy.store.list_adapters(tenant, limit + 1, after)
        return JSONResponse(page(items, limit, adapter_view, lambda a: a.name))

    async def get_adapter(self, request: Request) -> Response:
        _, tenant = await self._caller(request)
        return JSONResponse(adapter_view(await self.tenancy.adapter(tenant, request.path_params["name"])))

    async def delete_adapter(self, request: Request) -> Response:
        principal, tenant = await self._caller(request)
        record = await self.tenancy.delete_adapter(principal.subject, tenant, request.path_params["name"])
        return JSONResponse({"id": record.name, "object": "adapter", "deleted": True})

    # gateway keys and usage ------------------------------------------------------------------
    async def recipient_keys(self, request: Request) -> Response:
        keys = self.tenancy.keys.recipient_keys()
        data = [recipient_key_entry(k.private.public_key(), created=k.created, current=i == len(keys) - 1)
                for i, k in enumerate(keys)]
        return JSONResponse({"object": "list", "data": data})

    async def get_usage(self, request: Request) -> Response:
        _, tenant = await self._caller(request)
        await self.usage.flush()
        return JSONResponse(usage_view(await self.tenancy.store.usage(tenant, request.query_params.get("since"))))

    # self-service (tenant-admin) ---------------------------------------------------------------
    async def list_keys(self, request: Request) -> Response:
        _, tenant = await self._caller(request, "tenant-admin")
        limit, after = page_params(request)
        items = await self.tenancy.store.list_api_keys(tenant, limit + 1, after)
        return JSONResponse(page(items, limit, key_view, lambda k: k.id))

    async def create_key(self, request: Request) -> Response:
        principal, tenant = await self._caller(request, "tenant-admin")
        body = await self._json(request)
        key, record = await self.tenancy.issue_key(principal.subject, tenant, scopes_field(body),
                                                   _name(body))
        return JSONResponse({**key_view(record), "key": key}, status_code=201)

    async def revoke_key(self, request: Request) -> Response:
        principal, tenant = await self._caller(request, "tenant-admin")
        record = await self.tenancy.revoke_key(principal.subject, request.path_params["key_id"], tenant)
        return JSONResponse(key_view(record))

    async def list_signing_keys(self, request: Request) -> Response:
        _, tenant = await self._caller(request, "tenant-admin")
        keys = await self.tenancy.store.list_signing_keys(tenant, include_revoked=True)
        return JSONResponse({"object": "list", "data": [signing_key_view(k) for k in keys], "has_more": False})

    async def add_signing_key(self, request: Request) -> Response:
        principal, tenant = await self._caller(request, "tenant-admin")
        record = await self.tenancy.register_signing_key(principal.subject, tenant, await self._json(request))
        return JSONResponse(signing_key_view(record), status_code=201)

    async def revoke_signing_key(self, request: Request) -> Response:
        principal, tenant = await self._caller(request, "tenant-admin")
        record = await self.tenancy.revoke_signing_key(principal.subject, tenant, request.path_params["key_id"])
        return JSONResponse(signing_key_view(record))

    # experts and model "auto" ----------------------------------------------------------------
    async def get_experts(self, request: Request) -> Response:
        """The table as the router serves it; ``skipped_keywords`` lists stored keywords this
        version no longer accepts (and leaves out), so the tenant can see what to fix."""
        _, tenant = await self._caller(request)
        served = await self.auto.served(tenant)
        if served is None:
            raise errors.NotFound("No expert table: PUT /v1/experts to create one.", code="no_expert_table")
        view = {"object": "expert_table", **served.table.to_dict()}
        if served.skipped:
            view["skipped_keywords"] = [kw.to_dict() for kw in served.skipped]
        return JSONResponse(view)

    async def put_experts(self, request: Request) -> Response:
        principal, tenant = await self._caller(request, "tenant-admin")
        body = await self._json(request)
        body.pop("object", None)
        try:
            table = await asyncio.to_thread(ExpertTable.from_dict, body)  # compiles every pattern: off the loop
        except (ValueError, TypeError) as exc:
            raise errors.InvalidRequest(f"Invalid expert table: {exc}", param="experts",
                                        code="invalid_value") from None
        base = self.tenancy.reserved
        for expert in table.experts:
            if expert.adapter not in base and await self.tenancy.store.get_adapter(tenant, expert.adapter) is None:
                raise errors.InvalidRequest(f"Expert '{expert.name}' names adapter '{expert.adapter[:64]}', which "
                                            "you do not have.", param="experts", code="adapter_not_found")
        await self.tenancy.store.put_experts(tenant, table.to_dict())
        await self.tenancy.audit(principal.subject, "experts.put", tenant,
                                 experts=[e.name for e in table.experts])
        return JSONResponse({"object": "expert_table", **table.to_dict()})

    async def route(self, request: Request) -> Response:
        principal, tenant = await self._caller(request)
        body = await self._json(request)
        prompt = body.get("prompt")
        if prompt is None and "messages" in body:
            chat = parse_chat({"model": AUTO, "messages": body["messages"]})
            text = classified_text(chat.messages)
        elif isinstance(prompt, str) and prompt:
            text = prompt
        else:
            raise errors.InvalidRequest("Send 'messages' (chat) or 'prompt' (a non-empty string).", param="prompt",
                                        code="missing_required_parameter")
        return JSONResponse(decision_view(await self.auto.decide(tenant, text)))

    async def _json(self, request: Request) -> dict[str, Any]:
        return await read_object(request, self.max_body_bytes)


def _name(body: dict[str, Any]) -> str:
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > 128:
        raise errors.InvalidRequest("Invalid 'name': a string of at most 128 characters.", param="name",
                                    code="invalid_value")
    return name
