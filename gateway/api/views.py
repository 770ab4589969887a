"""JSON views of registry records (never a secret: API keys show their prefix only) and the
OpenAI list shape with ``limit``/``after`` paging."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from .. import errors
from ..store import AdapterRecord, ApiKeyRecord, AuditEntry, SigningKeyRecord, Tenant, UsageRow

T = TypeVar("T")
MAX_LIMIT = 100


def int_query(request: Request, name: str, default: int, low: int, high: int) -> int:
    """The integer query parameter ``name`` within [low, high] (``default`` when absent)."""
    raw = request.query_params.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise errors.InvalidRequest(f"Invalid '{name}': expected an integer.", param=name,
                                    code="invalid_type") from None
    if not low <= value <= high:
        raise errors.InvalidRequest(f"Invalid '{name}': must be between {low} and {high}.", param=name,
                                    code="invalid_value")
    return value


def page_params(request: Request, default: int = 20) -> tuple[int, str | None]:
    return int_query(request, "limit", default, 1, MAX_LIMIT), request.query_params.get("after") or None


def page(items: Sequence[T], limit: int, view: Callable[[T], dict[str, Any]], ident: Callable[[T], str]) -> dict:
    """``items`` was fetched with ``limit + 1`` to learn whether more follow."""
    shown = list(items[:limit])
    return {"object": "list", "data": [view(i) for i in shown], "has_more": len(items) > limit,
            "first_id": ident(shown[0]) if shown else None, "last_id": ident(shown[-1]) if shown else None}


def tenant_view(t: Tenant) -> dict[str, Any]:
    return {"object": "tenant", "id": t.id, "name": t.name, "created": t.created, "suspended": t.suspended,
            "quotas": t.quotas}


def key_view(k: ApiKeyRecord) -> dict[str, Any]:
    return {"object": "api_key", "id": k.id, "tenant": k.tenant, "prefix": k.prefix, "scopes": list(k.scopes),
            "name": k.name, "created": k.created, "revoked": k.revoked}


def signing_key_view(k: SigningKeyRecord) -> dict[str, Any]:
    return {"object": "signing_key", "id": k.id, "tenant": k.tenant, "created": k.created, "revoked": k.revoked}


def adapter_view(a: AdapterRecord) -> dict[str, Any]:
    return {"object": "adapter", "id": a.name, "tenant": a.tenant, "version": a.version, "base_model": a.base_model,
            "rank": a.rank, "alpha": a.alpha, "target_modules": list(a.target_modules), "bytes": a.size,
            "sha256": a.sha256, "signer": a.signer, "created": a.created}


def usage_view(rows: Sequence[UsageRow]) -> dict[str, Any]:
    data = [{"day": r.day, "model": r.model, "requests": r.requests, "prompt_tokens": r.prompt_tokens,
             "completion_tokens": r.completion_tokens} for r in rows]
    return {"object": "list", "data": data,
            "total": {"requests": sum(r.requests for r in rows), "prompt_tokens": sum(r.prompt_tokens for r in rows),
                      "completion_tokens": sum(r.completion_tokens for r in rows)}}


def audit_view(e: AuditEntry) -> dict[str, Any]:
    return {"seq": e.seq, "time": e.time, "actor": e.actor, "action": e.action, "target": e.target,
            "detail": e.detail, "prev_hash": e.prev_hash, "hash": e.hash}
