"""``model: "auto"``: the tenant's expert table (in the store) and the router package pick the
adapter. The sentence encoder loads on first use, off the event loop, once per gateway."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from router import Decision, Encoder, ExpertTable, Router

from . import errors
from .store import Store

log = logging.getLogger("tensafe.gateway")
AUTO = "auto"


class AutoRouter:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._router: Router | None = None
        self._loading = asyncio.Lock()
        self._tables: dict[str, tuple[dict[str, Any], ExpertTable]] = {}  # tenant -> (stored, parsed)

    async def router(self) -> Router:
        if self._router is None:
            async with self._loading:
                if self._router is None:
                    t0 = time.perf_counter()
                    encoder = await asyncio.to_thread(Encoder)
                    self._router = Router(encoder)
                    log.info("router encoder loaded in %.1fs", time.perf_counter() - t0)
        return self._router

    async def table(self, tenant: str) -> ExpertTable | None:
        raw = await self.store.get_experts(tenant)
        if raw is None:
            return None
        cached = self._tables.get(tenant)
        if cached is None or cached[0] != raw:
            cached = (raw, ExpertTable.from_dict(raw))
            self._tables[tenant] = cached
        return cached[1]

    async def decide(self, tenant: str | None, text: str) -> Decision:
        if tenant is None:
            raise errors.PermissionDenied("model 'auto' needs a tenant credential.", code="tenant_required")
        table = await self.table(tenant)
        if table is None:
            raise errors.InvalidRequest("model 'auto' needs an expert table: PUT /v1/experts first.",
                                        param="model", code="no_expert_table")
        router = await self.router()
        return await router.route(tenant, table, text)

    async def close(self) -> None:
        if self._router is not None:
            await self._router.close()


def routing_text(messages: Any = None, prompt: str | None = None) -> str:
    """What the classifier reads: the last user turn of a chat, or the prompt."""
    if prompt is not None:
        return prompt
    for message in reversed(messages or ()):
        if message.role == "user":
            return message.content
    return messages[-1].content if messages else ""


def decision_view(decision: Decision) -> dict[str, Any]:
    return {"object": "route", "expert": decision.expert, "adapter": decision.adapter, "method": decision.method,
            "confidence": round(decision.confidence, 4),
            "scores": {k: round(v, 4) for k, v in decision.scores.items()}, "reason": decision.reason}
