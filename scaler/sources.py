"""Where the gateways' numbers come from.

``ScrapeSource`` scrapes every gateway replica's ``/metrics`` with a ``metrics``-scope key
(replicas from a static list, or every address a headless Service's DNS name resolves to,
re-resolved each round) every ``interval_s`` into a ``FleetWatch``. ``PromSource`` asks a
Prometheus server the same questions in PromQL. Both answer ``state(pool, ...)`` with a
``PoolState``; ``rounds`` tells after each round, so activation can be pushed at once.
"""
from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import httpx

from .exposition import parse
from .window import Capacity, FleetWatch, PoolState

log = logging.getLogger("tensafe.scaler")
Resolver = Callable[[str, int], Awaitable[list[str]]]


class SourceUnavailable(Exception):
    """No fresh numbers: no gateway replica answered lately (KEDA's fallback applies)."""


class Rounds:
    """Tells waiters that a round of fresh numbers is in (every waiter, however many)."""

    def __init__(self) -> None:
        self._next: asyncio.Future[None] | None = None

    def done(self) -> None:
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None

    async def wait(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._next)


class Source(Protocol):
    rounds: Rounds

    async def state(self, pool: str, quantile: float, window_s: float, recent_s: float) -> PoolState: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


async def resolve_all(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({i[4][0] for i in infos})


class ScrapeSource:
    def __init__(self, *, urls: Sequence[str] = (), dns: tuple[str, int] | None = None, scheme: str = "http",
                 key: str = "", interval_s: float = 0.5, timeout_s: float = 2.0, window_s: float = 30.0,
                 resolver: Resolver = resolve_all, clock: Callable[[], float] = time.monotonic,
                 verify: bool | str = True, stale_s: float | None = None) -> None:
        """``stale_s``: with no replica answering for this long, ``state`` raises
        SourceUnavailable (default: the larger of 5 s and four rounds)."""
        if not urls and dns is None:
            raise ValueError("name the gateway replicas: a list of URLs or a DNS name")
        self.urls, self.dns, self.scheme = list(urls), dns, scheme
        self.interval_s = interval_s
        self.resolver, self.clock = resolver, clock
        self.watch = FleetWatch(window_s=window_s, forget_s=max(10 * interval_s, 2 * window_s))
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=timeout_s, verify=verify)
        self.rounds = Rounds()
        self.failures: dict[str, str] = {}  # replica -> why its last scrape failed
        self.last_ok = -math.inf  # when any replica last answered
        self.stale_s = stale_s if stale_s is not None else max(5.0, 4 * interval_s)
        self._task: asyncio.Task[None] | None = None

    async def targets(self) -> list[str]:
        urls = list(self.urls)
        if self.dns is not None:
            host, port = self.dns
            for address in await self.resolver(host, port):
                shown = f"[{address}]" if ":" in address else address
                urls.append(f"{self.scheme}://{shown}:{port}")
        return urls

    async def scrape_once(self) -> None:
        urls = await self.targets()

        async def one(url: str) -> None:
            try:
                response = await self.client.get(url.rstrip("/") + "/metrics")
                response.raise_for_status()
                readings = parse(response.text)
            except (httpx.HTTPError, ValueError) as exc:
                if self.failures.get(url) is None:
                    log.warning("scraping %s failed: %s", url, type(exc).__name__)
                self.failures[url] = type(exc).__name__
                return
            self.failures.pop(url, None)
            self.last_ok = self.clock()
            self.watch.observe(url, self.last_ok, readings)

        await asyncio.gather(*(one(u) for u in urls))
        self.rounds.done()

    async def _loop(self) -> None:
        while True:
            try:
                await self.scrape_once()
            except Exception:  # noqa: BLE001 - a failed round is logged; the next one retries
                log.exception("scrape round failed")
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        await self.scrape_once()
        self._task = asyncio.create_task(self._loop(), name="scaler-scrape")

    async def state(self, pool: str, quantile: float, window_s: float, recent_s: float = 0.0) -> PoolState:
        """``recent_s`` is not needed here: every scrape notes when a pool last had a request."""
        if self.clock() - self.last_ok > self.stale_s:
            raise SourceUnavailable(f"no gateway replica answered in {self.stale_s:g} s")
        return self.watch.state(pool, self.clock(), quantile, window_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()


class PromSource:
    """PromQL against Prometheus's HTTP API (``/api/v1/query``); ``interval_s`` paces the
    activation checks (Prometheus itself is only as fresh as its scrape interval)."""

    def __init__(self, url: str, *, interval_s: float = 1.0, timeout_s: float = 5.0, headers: dict[str, str] | None
                 = None, verify: bool | str = True) -> None:
        self.url = url.rstrip("/")
        self.interval_s = interval_s
        self.client = httpx.AsyncClient(timeout=timeout_s, headers=headers or {}, verify=verify)
        self.rounds = Rounds()
        self.capacity = Capacity()
        self.clock = time.monotonic
        self._task: asyncio.Task[None] | None = None

    async def query(self, promql: str) -> float | None:
        """The query's single value (summed when it returns several series; None when none)."""
        response = await self.client.get(f"{self.url}/api/v1/query", params={"query": promql})
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"Prometheus refused the query: {body.get('error', '')[:200]}")
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            value = float(result[1])
            return None if math.isnan(value) else value
        values = [float(r["value"][1]) for r in result if not math.isnan(float(r["value"][1]))]
        return sum(values) if values else None

    async def state(self, pool: str, quantile: float, window_s: float, recent_s: float = 60.0) -> PoolState:
        """``idle_s`` is 0 when a request was measured within ``recent_s``, else infinite."""
        sel = f'pool="{pool}"'
        w = f"{max(1, round(window_s))}s"
        ready = f"(count(max by (backend) (tensafe_backend_up{{{sel}}}) == 1) or vector(0))"
        backlog = f"(sum(tensafe_queue_depth{{{sel}}}) or vector(0)) + (sum(tensafe_held_requests{{{sel}}}) or vector(0))"
        queries = {
            "q": f"histogram_quantile({quantile}, sum by (le) (increase(tensafe_ttft_seconds_bucket{{{sel}}}[{w}])))",
            "n": f"sum(increase(tensafe_ttft_seconds_count{{{sel}}}[{w}]))",
            "running": f"sum(tensafe_running{{{sel}}})",
            "queued": f"sum(tensafe_queue_depth{{{sel}}})",
            "held": f"sum(tensafe_held_requests{{{sel}}})",
            "running_mean": f"sum(avg_over_time(tensafe_running{{{sel}}}[{w}]))",
            "mean": f"avg_over_time(((sum(tensafe_running{{{sel}}}) or vector(0)) + {backlog})[{w}:])",
            "growth": f"deriv(({backlog})[{w}:])",
            "ready": ready,
            "ready_mean": f"avg_over_time({ready}[{w}:])",
            "ready_min": f"min_over_time({ready}[{w}:])",
            "starting": f'max(tensafe_pool_backends{{{sel},state="starting"}})',
            "slots": f"quantile(0.5, max by (backend) (tensafe_backend_max_sequence_slots and on (backend) "
                     f"tensafe_backend_up{{{sel}}}))",
            "recent": f"sum(increase(tensafe_ttft_seconds_count{{{sel}}}[{max(1, round(recent_s))}s]))",
        }
        names = list(queries)
        values = dict(zip(names, await asyncio.gather(*(self.query(queries[k]) for k in names)), strict=True))
        v = {k: x or 0.0 for k, x in values.items()}
        in_flight = v["running"] + v["queued"] + v["held"]
        idle = 0.0 if v["recent"] > 0 or v["n"] > 0 or in_flight > 0 else math.inf
        state = PoolState(
            ttft_quantile_s=values["q"] if v["n"] > 0 else None, requests=v["n"], throughput=v["n"] / window_s,
            in_flight=in_flight, in_flight_mean=v["mean"], running_mean=v["running_mean"], queued=v["queued"],
            held=v["held"], backlog_growth=v["growth"], ready=int(v["ready"]), ready_mean=v["ready_mean"],
            ready_min=int(v["ready_min"]), starting=int(v["starting"]), slots=v["slots"], idle_s=idle)
        self.capacity.learn(pool, self.clock(), state)
        return state

    async def _loop(self) -> None:
        while True:
            self.rounds.done()
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scaler-prom")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.aclose()
