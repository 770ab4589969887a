"""``model: "auto"``: the tenant's expert table (in the store) and the router package pick the
adapter. The sentence encoder loads on first use, off the event loop, once per gateway.

A stored table is validated again when read, by the running version, once per stored version:
keywords it no longer accepts are left out and logged (see :meth:`ExpertTable.from_stored`), and
a table that no longer validates at all answers ``invalid_expert_table`` until it is replaced."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router import Decision, Encoder, ExpertTable, Router, SkippedKeyword

from .. import errors
from ..store import Store

log = logging.getLogger("tensafe.gateway")
AUTO = "auto"


@dataclass(frozen=True)
class ServedTable:
    """A tenant's table as the router serves it, and the stored keywords left out of it."""

    table: ExpertTable
    skipped: tuple[SkippedKeyword, ...] = ()


def parse_stored(tenant: str, raw: dict[str, Any]) -> ServedTable | Exception:
    """``raw`` read leniently, or why it cannot be served. Logs what it leaves out: the tenant,
    the expert and the first 64 characters of the pattern (prompts are never logged)."""
    try:
        table, skipped = ExpertTable.from_stored(raw)
    except (ValueError, TypeError) as exc:  # InvalidExpertTable, or a shape validation did not foresee
        log.warning("expert table of tenant %s does not validate: %s", tenant, str(exc)[:300])
        return exc
    for kw in skipped:
        log.warning("expert table of tenant %s: skipped keyword %r of expert %r: %s", tenant, kw.pattern[:64],
                    kw.expert, kw.reason)
    return ServedTable(table, tuple(skipped))


def invalid_table(problem: Exception) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"Your stored expert table no longer validates ({str(problem)[:300]}); "
                                 "PUT /v1/experts a new one.", code="invalid_expert_table")


class AutoSelector:
    """Picks the adapter for ``model: "auto"`` from the tenant's stored expert table."""

    def __init__(self, store: Store, thread_initializer: Callable[[], object] | None = None) -> None:
        """``thread_initializer``: for the encoder's worker thread (see router.Encoder)."""
        self.store = store
        self._thread_initializer = thread_initializer
        self._router: Router | None = None
        self._loading = asyncio.Lock()
        # tenant -> (stored, parsed or why not): each stored version is parsed and logged once
        self._tables: dict[str, tuple[dict[str, Any], ServedTable | Exception]] = {}

    async def router(self) -> Router:
        if self._router is None:
            async with self._loading:
                if self._router is None:
                    t0 = time.perf_counter()
                    encoder = await asyncio.to_thread(functools.partial(
                        Encoder, thread_initializer=self._thread_initializer))
                    self._router = Router(encoder)
                    log.info("router encoder loaded in %.1fs", time.perf_counter() - t0)
        return self._router

    async def served(self, tenant: str) -> ServedTable | None:
        """The tenant's table as served (``None``: it has none); a stored table that no longer
        validates is an ``invalid_expert_table`` error, never a 500."""
        raw = await self.store.get_experts(tenant)
        if raw is None:
            return None
        cached = self._tables.get(tenant)
        if cached is None or cached[0] != raw:
            cached = (raw, await asyncio.to_thread(parse_stored, tenant, raw))  # compiles its patterns
            self._tables[tenant] = cached
        if isinstance(cached[1], Exception):
            raise invalid_table(cached[1])
        return cached[1]

    async def table(self, tenant: str) -> ExpertTable | None:
        served = await self.served(tenant)
        return None if served is None else served.table

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


def classified_text(messages: Any = None, prompt: str | None = None) -> str:
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
