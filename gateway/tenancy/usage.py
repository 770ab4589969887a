"""Per-tenant usage counters (requests and tokens per day and model), accumulated in memory
and written to the store in batches, so the hot path never waits on the store."""
from __future__ import annotations

import collections
import datetime
import logging
import time

from ..periodic import Periodic
from ..store import Store, StoreUnavailable

log = logging.getLogger("tensafe.gateway")


_day = ("", 0.0, 0.0)  # (a UTC date, its start and its end as Unix times)


def today(now: float | None = None) -> str:
    """The UTC date at ``now`` (default: now), ``YYYY-MM-DD``; formatted once per day, since
    this runs on every request."""
    global _day
    now = time.time() if now is None else now
    if not _day[1] <= now < _day[2]:
        date = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        start = datetime.datetime.combine(date, datetime.time(), datetime.UTC).timestamp()
        _day = (date.isoformat(), start, start + 86400)
    return _day[0]


class UsageRecorder:
    def __init__(self, store: Store, interval_s: float = 2.0) -> None:
        self.store = store
        self.interval_s = interval_s
        #: (tenant, incarnation, day, model) -> [requests, prompt tokens, completion tokens] not yet written
        self._pending: dict[tuple[str, str, str, str], list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        self._flusher = Periodic("usage-flush", interval_s, self._flush_logged)

    def add(self, tenant: str, model: str, prompt_tokens: int, completion_tokens: int, incarnation: str = "") -> None:
        """Count one request of ``tenant`` as it is in ``incarnation`` (the principal's): if the
        tenant is deleted before the count is written, the count goes nowhere, even when a new
        tenant of the same id exists by then."""
        row = self._pending[(tenant, incarnation, today(), model)]
        row[0] += 1
        row[1] += prompt_tokens
        row[2] += completion_tokens

    def forget(self, tenant: str) -> None:
        """Drop what ``tenant`` has not written yet (it is being deleted)."""
        for key in [k for k in self._pending if k[0] == tenant]:
            del self._pending[key]

    async def flush(self) -> None:
        """Write what was counted; rows the store refused stay pending for the next flush, rows
        of a tenant that is gone (or another incarnation of it) are dropped."""
        pending, self._pending = self._pending, collections.defaultdict(lambda: [0, 0, 0])
        rows = list(pending.items())
        for i, ((tenant, incarnation, day, model), (requests, prompt, completion)) in enumerate(rows):
            try:
                await self.store.add_usage(tenant, day, model, requests, prompt, completion, incarnation)
            except BaseException:
                for key, counts in rows[i:]:
                    row = self._pending[key]
                    for j, value in enumerate(counts):
                        row[j] += value
                raise

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except StoreUnavailable as exc:  # an outage: the rows wait for the next flush
            log.warning("usage flush postponed: %s", exc)
        except Exception:  # noqa: BLE001 - keep counting; the unwritten rows wait for the next flush
            log.exception("usage flush failed")

    def start(self) -> None:
        self._flusher.start()

    async def stop(self) -> None:
        await self._flusher.stop()
        await self.flush()
