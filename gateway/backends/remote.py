"""A Backend over one ``tensafe worker`` (the engine in another process or on another machine),
through the worker's HTTP API (shapes in ``gateway.worker``; both ends share ``worker.wire``).

- One ``httpx.AsyncClient`` per backend: keep-alive connections for the worker's sequence
  slots, more for its queue and the control calls, the token as a default header.
- ``generate`` streams the worker's NDJSON; a consumer that stops early closes the response,
  which the worker sees as a disconnect and aborts at once.
- ``adapters()`` and ``capacity()`` are synchronous in the protocol, so they read a snapshot:
  every answer carries the worker's capacity stamp (the newest wins), the adapter calls return
  the adapter list, and a background refresh fetches both every ``refresh_s`` while started.
- A worker that is down, refuses the connection or times out is ``BackendUnavailable`` (a full
  connection pool is ``BackendOverloaded``); an httpx error never escapes.
- Adapters travel as a safetensors body serialised off the event loop; the worker prepares
  them itself, so ``adapter_layout`` is "" and ``prepare_adapter`` only checks the rank.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from adapters.lora import LoraConfig

from ..periodic import Periodic
from ..worker import wire
from .base import EXTENSIONS, BackendChunk, BackendRequest, Capacity, Health, Message, Tokens
from .calls import pool_limits, response_json, serialise, transport_error
from .errors import AdapterProblem, BackendError, BackendUnavailable

log = logging.getLogger("tensafe.gateway")

class RemoteBackend:
    def __init__(self, url: str, token: str, *, name: str, timeout_s: float = 10.0, connect_timeout_s: float = 2.0,
                 stream_timeout_s: float = 600.0, refresh_s: float = 0.5,
                 verify: ssl.SSLContext | bool = True) -> None:
        """``timeout_s`` bounds each control call (and each write of a body); a generation may
        wait ``stream_timeout_s`` for each chunk, the first included (it may queue that long)."""
        self.name = name
        self.extensions = EXTENSIONS  # until the worker says which it honours
        self.url = str(httpx.URL(url)).rstrip("/")
        self._headers = {"authorization": f"Bearer {token}"}
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._stream_timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s, read=stream_timeout_s)
        self._client: httpx.AsyncClient | None = None
        self._verify = verify  # for an https:// worker: the CAs it is verified against
        self._refresher = Periodic(f"refresh-{name}", refresh_s, self._refresh)
        self._aborts: set[asyncio.Task] = set()
        self._capacity = Capacity(0, 0, 0, 0, 0)
        self._capacity_mark: tuple[str, int] | None = None
        self._adapters: list[str] = []
        self._adapters_mark: tuple[str, int] | None = None
        self._reachable = False
        self.model = ""
        self.max_model_len = 0
        self.max_queue = 0
        self.max_lora_rank = 0
        self.max_adapter_bytes = 0

    def __repr__(self) -> str:
        return f"RemoteBackend({self.url!r}, name={self.name!r})"

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Fetch the worker's capacity and limits (BackendUnavailable when it cannot be
        reached), then open the connection pool sized to them and start the refresh."""
        if self._client is not None:
            return
        async with httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                     verify=self._verify) as probe:
            info = await self._fetch_capacity(probe)
        slots = info.max_sequence_slots
        limits = pool_limits(slots, self.max_queue)
        self._client = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                         limits=limits, verify=self._verify)
        health = await self.health()
        self.model = health.model
        self._refresher.start()

    async def close(self) -> None:
        """Stop the refresh and close the connections: streams still open end, which the
        worker takes as their abort."""
        await self._refresher.stop()
        for task in list(self._aborts):
            task.cancel()
        await asyncio.gather(*self._aborts, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        self._reachable = False
        self._capacity, self._adapters = Capacity(0, 0, 0, 0, 0), []  # as a backend not started

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise BackendUnavailable(f"backend {self.name!r} is not started")
        return self._client

    def _failed(self, exc: httpx.HTTPError) -> BackendError:
        return transport_error(exc, f"worker {self.url}")

    # ---- the snapshot -----------------------------------------------------------------------
    def _noted(self, response: httpx.Response) -> tuple[str, int] | None:
        """Apply the response's capacity stamp when it is the newest; its mark, if it has one."""
        raw = response.headers.get(wire.CAPACITY_HEADER)
        if raw is None:
            return None
        try:
            fields = json.loads(raw)
            capacity = wire.capacity_from(fields)
            mark = (str(fields["epoch"]), int(fields["seq"]))
        except (ValueError, KeyError, TypeError):
            return None
        if _newer(mark, self._capacity_mark):
            self._capacity, self._capacity_mark = capacity, mark
        return mark

    def _note_adapters(self, mark: tuple[str, int] | None, ids: Any) -> None:
        if mark is None or _newer(mark, self._adapters_mark):
            self._adapters, self._adapters_mark = wire.adapter_ids(ids), mark

    async def _fetch_capacity(self, client: httpx.AsyncClient) -> Capacity:
        response = await self._send(client, "GET", "/v1/capacity")
        body = response_json(response)
        try:
            capacity = wire.capacity_from(body)
            self.max_queue, self.max_lora_rank = int(body["max_queue"]), int(body["max_lora_rank"])
            self.max_model_len, self.max_adapter_bytes = int(body["max_model_len"]), int(body["max_adapter_bytes"])
        except (KeyError, TypeError, ValueError):
            raise BackendUnavailable(f"worker {self.url} sent a capacity that is not the worker API's") from None
        extensions = body.get("extensions")
        if isinstance(extensions, list):
            self.extensions = frozenset(e for e in extensions if isinstance(e, str)) & EXTENSIONS
        self._note_adapters(self._noted(response), body.get("adapters"))
        self._reachable = True
        return capacity

    async def _refresh(self) -> None:
        try:
            await self._fetch_capacity(self._http())
        except BackendError as exc:
            if self._reachable:
                log.warning("backend %s: %s", self.name, exc)
            self._reachable = False
            c = self._capacity
            self._capacity = Capacity(0, 0, 0, c.max_sequence_slots, c.max_adapter_slots)

    async def _send(self, client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None
        self._noted(response)
        if response.is_error:
            raise wire.error_from(response_json(response), response.status_code)
        return response

    # ---- generation ---------------------------------------------------------------------------
    async def generate(self, request: BackendRequest) -> AsyncIterator[BackendChunk]:
        client = self._http()
        body = wire.request_body(request)
        try:
            async with client.stream("POST", "/v1/generate", content=body, timeout=self._stream_timeout,
                                     headers={"content-type": "application/json"}) as response:
                self._noted(response)
                if response.status_code != 200:
                    await response.aread()
                    raise wire.error_from(response_json(response), response.status_code)
                finished = False
                # read to the end of the body (past the last chunk), so the connection is reused
                async for line in response.aiter_lines():
                    if line and not finished:
                        chunk = self._chunk(line)
                        finished = chunk.finish_reason is not None
                        yield chunk
                if not finished:
                    raise BackendUnavailable(f"worker {self.url} ended a stream before its last chunk")
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None

    def _chunk(self, line: str) -> BackendChunk:
        try:
            decoded = json.loads(line)
            return wire.chunk_from(decoded)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BackendUnavailable(f"worker {self.url} sent a line that is not a chunk") from None

    def abort(self, request_id: str) -> None:
        """The protocol's abort is synchronous: the call to the worker runs as a task of its own
        (closing the stream aborts as well; this reaches a request whose stream is elsewhere)."""
        if self._client is None:
            return
        task = asyncio.get_running_loop().create_task(self._abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, request_id: str) -> None:
        try:
            await self._send(self._http(), "POST", "/v1/abort", content=wire.dumps({"request_id": request_id}),
                             headers={"content-type": "application/json"})
        except BackendError as exc:
            log.info("backend %s: abort of %s not delivered: %s", self.name, request_id, exc)

    # ---- tokenizing -----------------------------------------------------------------------------
    async def tokenize(self, *, prompt: str | None = None, messages: Sequence[Message] | None = None,
                       add_special_tokens: bool = False, add_generation_prompt: bool = True,
                       with_strings: bool = False) -> Tokens:
        body = wire.tokenize_body(prompt, messages, add_special_tokens, add_generation_prompt, with_strings)
        response = await self._send(self._http(), "POST", "/v1/tokenize", content=body,
                                    headers={"content-type": "application/json"})
        return wire.tokens_from(response_json(response))

    async def detokenize(self, ids: Sequence[int]) -> str:
        response = await self._send(self._http(), "POST", "/v1/detokenize", content=wire.dumps({"tokens": list(ids)}),
                                    headers={"content-type": "application/json"})
        body = response_json(response)
        text = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise BackendUnavailable(f"worker {self.url} sent a detokenized text that is not a string")
        return text

    # ---- adapters -----------------------------------------------------------------------------
    def adapter_layout(self) -> str:
        return ""

    def prepare_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> Mapping[str, Any]:
        self._http()
        if config.rank > self.max_lora_rank:
            raise AdapterProblem(f"adapter {adapter_id!r}: rank {config.rank} exceeds max_lora_rank "
                                 f"{self.max_lora_rank} of worker {self.url}", adapter_id, "rank_too_large")
        return tensors

    async def load_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> None:
        self.prepare_adapter(adapter_id, tensors, config)
        body = await asyncio.to_thread(serialise, tensors)
        if len(body) > self.max_adapter_bytes:
            raise AdapterProblem(f"adapter {adapter_id!r}: {len(body)} bytes exceed worker_max_adapter_bytes "
                                 f"{self.max_adapter_bytes} of worker {self.url}", adapter_id, "invalid")
        response = await self._send(self._http(), "PUT", f"/v1/adapters/{quote(adapter_id, safe='')}", content=body,
                                    headers={"content-type": "application/octet-stream",
                                             wire.LORA_HEADER: wire.lora_header(config)})
        self._note_adapters(self._noted(response), (response_json(response) or {}).get("adapters"))

    async def unload_adapter(self, adapter_id: str) -> None:
        response = await self._send(self._http(), "DELETE", f"/v1/adapters/{quote(adapter_id, safe='')}")
        self._note_adapters(self._noted(response), (response_json(response) or {}).get("adapters"))

    def adapters(self) -> list[str]:
        return list(self._adapters)

    # ---- state ----------------------------------------------------------------------------------
    async def health(self) -> Health:
        """The worker's own health; a worker that cannot be reached is not ok (never raises)."""
        if self._client is None:
            return Health(ok=False, model=self.model, max_model_len=self.max_model_len, detail="not started")
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError as exc:
            return Health(ok=False, model=self.model, max_model_len=self.max_model_len,
                          detail=str(self._failed(exc)))
        self._noted(response)
        body = response_json(response)
        if not isinstance(body, dict):
            return Health(ok=False, model=self.model, max_model_len=self.max_model_len,
                          detail=f"worker {self.url} answered {response.status_code}")
        return Health(ok=response.status_code == 200 and body.get("ok") is True, model=str(body.get("model", "")),
                      max_model_len=int(body.get("max_model_len") or 0), detail=str(body.get("detail", "")))

    async def model_config(self) -> dict[str, Any] | None:
        config = response_json(await self._send(self._http(), "GET", "/v1/model-config"))
        return config if isinstance(config, dict) else None

    def capacity(self) -> Capacity:
        return self._capacity


def _newer(mark: tuple[str, int], last: tuple[str, int] | None) -> bool:
    """Stamps of one worker process are ordered by ``seq``; one from another process (the
    worker restarted) replaces whatever came before."""
    return last is None or mark[0] != last[0] or mark[1] > last[1]
