"""Per-tenant usage counters (requests and tokens per day and model), accumulated in memory
and written to the store in batches, so the hot path never waits on the store."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging

from .store import Store

log = logging.getLogger("tensafe.gateway")


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


class UsageRecorder:
    def __init__(self, store: Store, interval_s: float = 2.0) -> None:
        self.store = store
        self.interval_s = interval_s
        self._pending: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        self._task: asyncio.Task | None = None

    def add(self, tenant: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        day = today()
        self._pending[(tenant, day, model, "requests")] += 1
        self._pending[(tenant, day, model, "prompt")] += prompt_tokens
        self._pending[(tenant, day, model, "completion")] += completion_tokens

    async def flush(self) -> None:
        pending, self._pending = self._pending, collections.Counter()
        rows: dict[tuple[str, str, str], dict[str, int]] = collections.defaultdict(dict)
        for (tenant, day, model, field), value in pending.items():
            rows[(tenant, day, model)][field] = value
        for (tenant, day, model), v in rows.items():
            await self.store.add_usage(tenant, day, model, v.get("requests", 0), v.get("prompt", 0),
                                       v.get("completion", 0))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - keep counting; the next flush retries nothing lost twice
                log.exception("usage flush failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
