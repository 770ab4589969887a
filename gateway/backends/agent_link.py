"""A backend's side of ``tensafe agent`` (``gateway.agent``): the adapters of a vLLM or LoRAX
server go to the agent beside it, never to the server directly. The agent writes them into
memory-backed files; this gateway replica holds a lease on each adapter it streams from,
renewed in the background while requests run and beside (or, once it is nearly out, before) a
request on an adapter whose lease is past half its life. The agent's token is a secret: sent
as a header, never logged or shown in a repr."""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from adapters.lora import LoraConfig
from adapters.peft import peft_config

from ..periodic import Periodic
from ..worker import wire
from .base import Capacity, Health
from .calls import pool_limits, response_json, send, serialise
from .errors import AdapterProblem, BackendError, BackendUnavailable

log = logging.getLogger("tensafe.gateway")
CONFIG_HEADER = "x-tensafe-peft-config"


def replica_holder() -> str:
    """This gateway process's name on the agents' leases."""
    return f"{socket.gethostname()[:64]}-{os.getpid()}-{os.urandom(4).hex()}"


class AgentLink:
    def __init__(self, url: str, *, backend: str, token: str = "", holder: str | None = None,
                 timeout: httpx.Timeout, lease_ttl_s: float = 30.0, verify: ssl.SSLContext | bool = True) -> None:
        self.url = str(httpx.URL(url)).rstrip("/")
        self.backend = backend
        self.holder = holder or replica_holder()
        self.lease_ttl_s = lease_ttl_s
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._verify = verify  # for an https:// agent: the CAs it is verified against
        self._client: httpx.AsyncClient | None = None
        self._renewer = Periodic(f"leases-{backend}", lease_ttl_s / 3, self._renew_running)
        self.inflight: collections.Counter[str] = collections.Counter()
        self._lease_until: dict[str, float] = {}
        self._renewing: dict[str, asyncio.Task] = {}  # lease renewals running beside requests
        self.held: list[str] = []
        self.paths: dict[str, str] = {}  # adapter id -> its directory (where the server reads it)
        self.max_adapters = 0

    def __repr__(self) -> str:
        return f"AgentLink({self.url!r}, holder={self.holder!r})"

    def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                             verify=self._verify)
            self._renewer.start()

    async def close(self) -> None:
        await self._renewer.stop()
        for task in list(self._renewing.values()):
            task.cancel()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _agent(self) -> httpx.AsyncClient:
        if self._client is None:
            raise BackendUnavailable(f"backend {self.backend!r} is not started")
        return self._client

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await send(self._agent(), f"agent {self.url}", method, path, **kwargs)
        body = response_json(response)
        if response.is_error:
            raise wire.error_from(body, response.status_code)
        if isinstance(body, dict) and isinstance(body.get("adapters"), list):
            self._note_holdings(body)
        return body

    async def refresh(self) -> None:
        await self.call("GET", "/v1/adapters")

    def _note_holdings(self, body: Any) -> None:
        try:
            held = body["adapters"]
            self.held = [str(a["adapter_id"]) for a in held]
            self.paths = {str(a["adapter_id"]): str(a.get("path") or "") for a in held}
            self.max_adapters = int(body.get("max_adapters") or self.max_adapters)
        except (KeyError, TypeError, ValueError):
            raise BackendUnavailable(f"agent {self.url} sent holdings that are not the agent API's") from None

    async def healthy(self) -> bool:
        try:
            return (await self._agent().get("/health")).status_code == 200
        except (httpx.HTTPError, BackendUnavailable):
            return False

    # ---- leases -------------------------------------------------------------------------------
    async def _renew(self, ids: list[str]) -> list[str]:
        """Renew our leases on ``ids``; those the agent no longer holds."""
        body = await self.call("POST", "/v1/leases", json={"holder": self.holder, "ttl_s": self.lease_ttl_s,
                                                            "adapters": ids})
        until = time.monotonic() + self.lease_ttl_s
        missing = [str(m) for m in (body or {}).get("missing", [])]
        for adapter_id in ids:
            if adapter_id in missing:
                self._lease_until.pop(adapter_id, None)
            else:
                self._lease_until[adapter_id] = until
        return missing

    async def _renew_beside(self, adapter_id: str) -> None:
        try:
            await self._renew([adapter_id])  # a miss drops our lease: the next request finds out
        except BackendError as exc:
            log.warning("backend %s: lease renewal failed: %s", self.backend, exc)
        finally:
            self._renewing.pop(adapter_id, None)

    async def _renew_running(self) -> None:
        running = [a for a, n in self.inflight.items() if n > 0]
        if running:
            try:
                await self._renew(running)
            except BackendError as exc:
                log.warning("backend %s: lease renewal failed: %s", self.backend, exc)

    async def hold(self, adapter_id: str) -> None:
        """Make sure our lease on ``adapter_id`` outlasts the request's start. A lease past half
        its life is renewed beside the request while it still has a sixth left (the request
        goes at once; running adapters are renewed every third of the TTL), and before it
        otherwise."""
        left = self._lease_until.get(adapter_id, 0.0) - time.monotonic()
        if left > self.lease_ttl_s / 2:
            return
        if left > self.lease_ttl_s / 6:
            if adapter_id not in self._renewing:
                task = asyncio.get_running_loop().create_task(self._renew_beside(adapter_id))
                self._renewing[adapter_id] = task
            return
        if await self._renew([adapter_id]):
            raise AdapterProblem(f"adapter {adapter_id!r} is no longer held by the agent of {self.backend}",
                                 adapter_id, "not_found")

    def started(self, adapter_id: str) -> None:
        self.inflight[adapter_id] += 1

    def finished(self, adapter_id: str) -> None:
        self.inflight[adapter_id] -= 1
        if self.inflight[adapter_id] <= 0:
            del self.inflight[adapter_id]

    # ---- adapters -------------------------------------------------------------------------------
    async def load(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> None:
        body = await asyncio.to_thread(serialise, tensors)
        response = await send(self._agent(), f"agent {self.url}", "PUT", f"/v1/adapters/{quote(adapter_id, safe='')}",
                              params={"holder": self.holder, "ttl_s": self.lease_ttl_s}, content=body,
                              headers={"content-type": "application/octet-stream",
                                       CONFIG_HEADER: json.dumps(peft_config(config))})
        answer = response_json(response)
        if response.is_error:
            raise wire.error_from(answer, response.status_code)
        self._note_holdings(answer)
        self._lease_until[adapter_id] = time.monotonic() + self.lease_ttl_s
        if response.status_code == 200:  # the agent held it already (another replica loaded it): leased now
            raise AdapterProblem(f"adapter {adapter_id!r} is already loaded on {self.backend}", adapter_id, "exists")

    async def unload(self, adapter_id: str) -> None:
        if self.inflight.get(adapter_id):
            raise AdapterProblem(f"adapter {adapter_id!r} is used by {self.inflight[adapter_id]} request(s) here; "
                                 "unload refused", adapter_id, "in_use")
        await self.call("DELETE", f"/v1/adapters/{quote(adapter_id, safe='')}", params={"holder": self.holder})
        self._lease_until.pop(adapter_id, None)


class AgentBacked:
    """What the backends over a server with an agent beside it (vLLM, LoRAX) share: adapters go
    through the agent, health is the server's and the agent's, capacity counts the agent's
    holdings as adapter slots. A subclass sets these attributes and ``KIND``."""

    KIND = "server"
    name: str
    url: str
    served_model: str
    agent: AgentLink
    max_num_seqs: int
    max_lora_rank: int
    max_model_len: int
    max_queue: int
    _http_client: httpx.AsyncClient | None
    _http_headers: dict[str, str]
    _timeout: httpx.Timeout
    _verify: ssl.SSLContext | bool
    _refresher: Periodic
    _model_config: dict[str, Any] | None
    _reachable: bool
    _running: int

    async def _connect(self) -> None:
        """Read what the server is (its model, its limits) once it can be reached."""

    async def _refresh_state(self) -> None:
        await self.agent.refresh()
        self._reachable = True

    async def start(self) -> None:
        """Connect to the server and its agent (BackendUnavailable when either cannot be reached):
        one keep-alive pool sized to the sequence slots."""
        if self._http_client is not None:
            return
        self._http_client = httpx.AsyncClient(base_url=self.url, headers=self._http_headers, timeout=self._timeout,
                                              limits=pool_limits(self.max_num_seqs, self.max_queue),
                                              verify=self._verify)
        self.agent.start()
        try:
            await self._connect()
            await self._refresh_state()
        except BaseException:
            await self.close()
            raise
        self._refresher.start()

    async def close(self) -> None:
        await self._refresher.stop()
        await self.agent.close()
        client, self._http_client = self._http_client, None
        if client is not None:
            await client.aclose()
        self._reachable = False

    async def _refresh(self) -> None:
        try:
            await self._refresh_state()
        except BackendError as exc:
            if self._reachable:
                log.warning("backend %s: %s", self.name, exc)
            self._reachable = False

    def _http(self) -> httpx.AsyncClient:
        if self._http_client is None:
            raise BackendUnavailable(f"backend {self.name!r} is not started")
        return self._http_client

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await send(self._http(), f"{self.KIND} at {self.url}", method, path, **kwargs)

    def _queued(self) -> int:
        """Requests the server holds waiting (0: it does not say)."""
        return 0

    def adapter_layout(self) -> str:
        return ""

    def prepare_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> Mapping[str, Any]:
        if config.rank > self.max_lora_rank:
            raise AdapterProblem(f"adapter {adapter_id!r}: rank {config.rank} exceeds max_lora_rank "
                                 f"{self.max_lora_rank} of {self.name}", adapter_id, "rank_too_large")
        return tensors

    async def load_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> None:
        self.prepare_adapter(adapter_id, tensors, config)
        await self.agent.load(adapter_id, tensors, config)

    async def unload_adapter(self, adapter_id: str) -> None:
        await self.agent.unload(adapter_id)

    def adapters(self) -> list[str]:
        return list(self.agent.held)

    async def health(self) -> Health:
        """The server's own health (503: its engine died) and its agent's; never raises."""
        if self._http_client is None:
            return Health(False, self.served_model, self.max_model_len, "not started")
        try:
            ok = (await self._http_client.get("/health")).status_code == 200
            detail = "" if ok else f"{self.KIND} is unhealthy"
            if ok and not await self.agent.healthy():
                ok, detail = False, "its agent is not ready"
        except httpx.HTTPError as exc:
            ok, detail = False, f"unreachable: {type(exc).__name__}"
        return Health(ok, self.served_model, self.max_model_len, detail or f"{self.KIND} {self.url}")

    async def model_config(self) -> dict[str, Any] | None:
        return self._model_config

    def capacity(self) -> Capacity:
        slots = self.agent.max_adapters
        if not self._reachable:
            return Capacity(0, 0, 0, self.max_num_seqs, slots, self.max_lora_rank)
        return Capacity(max(0, self.max_num_seqs - self._running), max(0, slots - len(self.agent.held)),
                        self._queued(), self.max_num_seqs, slots, self.max_lora_rank)
