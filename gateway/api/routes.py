"""The route table. Each endpoint looks its API object up on the gateway when it is called:
the APIs are built once the gateway has started (they need the backend's model), while the
table must exist when the app is made."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def _late(owner: Any, api: str, method: str) -> Any:
    async def endpoint(request: Request) -> Response:
        return await getattr(getattr(owner, api), method)(request)
    endpoint.__name__ = method
    return endpoint


#: (path, HTTP method, API attribute on the gateway, handler), matched in order: hot routes first
ROUTES: tuple[tuple[str, str, str, str], ...] = (
    ("/v1/chat/completions", "POST", "openai", "chat_completions"),
    ("/v1/completions", "POST", "openai", "completions"),
    ("/health", "GET", "operations", "health"),
    ("/ready", "GET", "operations", "ready"),
    ("/metrics", "GET", "operations", "metrics_text"),
    ("/v1/models", "GET", "openai", "list_models"),
    ("/v1/models/{model:path}", "GET", "openai", "get_model"),
    ("/tokenize", "POST", "openai", "tokenize"),
    ("/detokenize", "POST", "openai", "detokenize"),
    ("/v1/adapters", "POST", "tenant_api", "upload"),
    ("/v1/adapters", "GET", "tenant_api", "list_adapters"),
    ("/v1/adapters/{name}", "GET", "tenant_api", "get_adapter"),
    ("/v1/adapters/{name}", "DELETE", "tenant_api", "delete_adapter"),
    ("/v1/tssp/recipient", "GET", "tenant_api", "recipient_keys"),
    ("/v1/usage", "GET", "tenant_api", "get_usage"),
    ("/v1/experts", "GET", "tenant_api", "get_experts"),
    ("/v1/experts", "PUT", "tenant_api", "put_experts"),
    ("/v1/route", "POST", "tenant_api", "route"),
    ("/v1/keys", "GET", "tenant_api", "list_keys"),
    ("/v1/keys", "POST", "tenant_api", "create_key"),
    ("/v1/keys/{key_id}", "DELETE", "tenant_api", "revoke_key"),
    ("/v1/signing-keys", "GET", "tenant_api", "list_signing_keys"),
    ("/v1/signing-keys", "POST", "tenant_api", "add_signing_key"),
    ("/v1/signing-keys/{key_id}", "DELETE", "tenant_api", "revoke_signing_key"),
    ("/admin/tenants", "POST", "admin_api", "create_tenant"),
    ("/admin/tenants", "GET", "admin_api", "list_tenants"),
    ("/admin/tenants/{tenant}", "GET", "admin_api", "get_tenant"),
    ("/admin/tenants/{tenant}", "PATCH", "admin_api", "update_tenant"),
    ("/admin/tenants/{tenant}", "DELETE", "admin_api", "delete_tenant"),
    ("/admin/tenants/{tenant}/keys", "POST", "admin_api", "create_key"),
    ("/admin/tenants/{tenant}/keys", "GET", "admin_api", "list_keys"),
    ("/admin/keys/{key_id}", "DELETE", "admin_api", "revoke_key"),
    ("/admin/tenants/{tenant}/signing-keys", "POST", "admin_api", "add_signing_key"),
    ("/admin/tenants/{tenant}/signing-keys", "GET", "admin_api", "list_signing_keys"),
    ("/admin/tenants/{tenant}/signing-keys/{key_id}", "DELETE", "admin_api", "revoke_signing_key"),
    ("/admin/tenants/{tenant}/usage", "GET", "admin_api", "tenant_usage"),
    ("/admin/tenants/{tenant}/adapters/{name}", "DELETE", "admin_api", "delete_adapter"),
    ("/admin/adapters", "GET", "admin_api", "list_adapters"),
    ("/admin/audit", "GET", "admin_api", "audit"),
    ("/admin/audit/verify", "GET", "admin_api", "audit_verify"),
    ("/admin/cache", "GET", "admin_api", "cache_stats"),
    ("/admin/keys", "POST", "admin_api", "create_operator_key"),
    ("/admin/keys", "GET", "admin_api", "list_operator_keys"),
    ("/admin/backends", "GET", "fleet_api", "backends"),
    ("/admin/backends/{pool}/{backend}/drain", "POST", "fleet_api", "drain"),
    ("/admin/backends/{pool}/{backend}/undrain", "POST", "fleet_api", "undrain"),
    ("/admin/cache/{tenant}/{name}/{action}", "POST", "admin_api", "cache_action"),
)


def routes(owner: Any) -> list[Route]:
    return [Route(path, _late(owner, api, handler), methods=[method]) for path, method, api, handler in ROUTES]
