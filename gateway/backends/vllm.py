"""A Backend over one vLLM server (its OpenAI API) and the ``tensafe agent`` beside it.

- Generation: ``/v1/chat/completions`` for messages, ``/v1/completions`` for a prompt or token
  ids, always streamed, with ``stream_options: {include_usage, continuous_usage_stats}`` so
  every chunk carries the exact token counts; ``x-request-id`` is passed through; the
  acceptance is a chat stream's opening chunk (the role and the prompt's count) or, for a
  text completion, the answer's headers (vLLM validates before it answers); closing the stream closes
  the upstream response, which vLLM takes as the request's abort. One keep-alive pool per
  backend sized to its sequence slots, connect and read timeouts.
- Adapters go to the agent (``gateway.agent``, through ``agent_link``), never to vLLM
  directly: the agent writes them into memory-backed files and registers them under our
  internal id; this replica leases the adapters it streams from.
- State, refreshed every ``refresh_s``: load from vLLM's ``/metrics``
  (``vllm:num_requests_running``/``waiting``, ``kv_cache_usage_perc``, the newest
  ``vllm:lora_requests_info``) and the registered adapters from the agent.
- vLLM's API key and the agent's token are secrets: sent as headers, never logged or shown in
  a repr.
"""
from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..periodic import Periodic
from .agent_link import AgentBacked, AgentLink
from .base import EXTENSIONS, BackendChunk, BackendRequest, Message, Tokens
from .errors import (
    AdapterProblem,
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
    BadRequest,
    ContextTooLong,
)

log = logging.getLogger("tensafe.gateway")
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}
_PARAMETER = re.compile(r"parameter=(\w+)")
_VALIDATION = re.compile(r"^(\w+) must be")


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300], None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message", ""))[:500]
        param = error.get("param")
        if not isinstance(param, str):  # vLLM names it in the message: "(parameter=max_tokens, ...)"
            named = _PARAMETER.search(message) or _VALIDATION.search(message)
            param = named.group(1) if named else None
        return message, param
    return str(body)[:300], None


def refusal(response: httpx.Response, model: str) -> BackendError:
    """The error a vLLM error answer stands for."""
    message, param = _error_message(response)
    status = response.status_code
    if status == 400:
        if "context length" in message or "max_model_len" in message or "maximum context" in message:
            return ContextTooLong(message, param=param or "max_tokens")
        return BadRequest(message, param=param)
    if status == 404:
        return AdapterProblem(f"vLLM does not have {model!r} registered: {message}", model, "not_found")
    if status in (429, 503):
        return BackendOverloaded(f"vLLM answered {status}: {message}")
    return BackendUnavailable(f"vLLM answered {status}: {message}")


class VllmBackend(AgentBacked):
    KIND = "vLLM"

    def __init__(self, url: str, agent_url: str, *, name: str, served_model: str, api_key: str = "",
                 agent_token: str = "", holder: str | None = None, max_num_seqs: int = 32, max_queue: int = 256,
                 max_lora_rank: int = 16, model_config: dict[str, Any] | None = None, timeout_s: float = 10.0,
                 connect_timeout_s: float = 2.0, stream_timeout_s: float = 600.0, refresh_s: float = 0.5,
                 lease_ttl_s: float = 30.0, verify: ssl.SSLContext | bool = True) -> None:
        self.name = name
        self.extensions = EXTENSIONS  # vLLM's own names for them, passed through
        self.url = str(httpx.URL(url)).rstrip("/")
        self.served_model = served_model
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.max_lora_rank = max_lora_rank
        self._model_config = model_config
        self._http_headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._stream_timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s, read=stream_timeout_s)
        self._http_client: httpx.AsyncClient | None = None
        self._verify = verify
        self.agent = AgentLink(agent_url, backend=name, token=agent_token, holder=holder, timeout=self._timeout,
                               lease_ttl_s=lease_ttl_s, verify=verify)
        self.agent_url = self.agent.url
        self._refresher = Periodic(f"refresh-{name}", refresh_s, self._refresh)
        self._running = self._waiting = 0
        self.kv_cache_usage = 0.0
        self.lora_running: tuple[str, ...] = ()
        self.lora_waiting: tuple[str, ...] = ()
        self._reachable = False
        self.max_model_len = 0

    def __repr__(self) -> str:
        return f"VllmBackend({self.url!r}, agent={self.agent_url!r}, name={self.name!r})"

    # ---- state ------------------------------------------------------------------------------------
    async def _connect(self) -> None:  # the served model and its context length
        response = await self._send("GET", "/v1/models")
        if response.status_code != 200:
            raise refusal(response, self.served_model)
        try:
            models = response.json()["data"]
            base = next(m for m in models if m["id"] == self.served_model)
        except (ValueError, KeyError, TypeError, StopIteration):
            raise BackendUnavailable(f"vLLM at {self.url} does not serve {self.served_model!r}") from None
        self.max_model_len = int(base.get("max_model_len") or 0)

    async def _refresh_state(self) -> None:
        response = await self._send("GET", "/metrics")
        if response.status_code != 200:
            raise BackendUnavailable(f"vLLM at {self.url} answered {response.status_code} for its metrics")
        self._read_metrics(response.text)
        await self.agent.refresh()
        self._reachable = True

    def _read_metrics(self, text: str) -> None:
        newest = -1.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "vllm:num_requests_running":
                    self._running = int(sample.value)
                elif sample.name == "vllm:num_requests_waiting":
                    self._waiting = int(sample.value)
                elif sample.name == "vllm:kv_cache_usage_perc":
                    self.kv_cache_usage = float(sample.value)
                elif sample.name == "vllm:lora_requests_info" and sample.value > newest:
                    newest = sample.value  # a timestamp: the newest series is the current one
                    self.lora_running = _names(sample.labels.get("running_lora_adapters", ""))
                    self.lora_waiting = _names(sample.labels.get("waiting_lora_adapters", ""))

    # ---- generation -------------------------------------------------------------------------------
    def _body(self, request: BackendRequest) -> tuple[str, dict[str, Any]]:
        s = request.sampling
        body: dict[str, Any] = {"model": request.adapter_id or self.served_model, "temperature": s.temperature,
                                "top_p": s.top_p, "stream": True,
                                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        if s.max_tokens is not None:
            body["max_tokens"] = s.max_tokens
        for name, value, neutral in (("seed", s.seed, None), ("stop", list(s.stop), []),
                                     ("ignore_eos", s.ignore_eos, False), ("min_tokens", s.min_tokens, 0),
                                     ("top_k", s.top_k, 0), ("repetition_penalty", s.repetition_penalty, 1.0),
                                     ("stop_token_ids", list(s.stop_token_ids), [])):
            if value != neutral:
                body[name] = value
        if request.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            return "/v1/chat/completions", body
        body["prompt"] = list(request.prompt_token_ids) if request.prompt_token_ids is not None else request.prompt
        return "/v1/completions", body

    async def generate(self, request: BackendRequest) -> AsyncIterator[BackendChunk]:
        vllm = self._http()
        adapter = request.adapter_id
        path, body = self._body(request)
        chat = path == "/v1/chat/completions"
        if adapter is not None:
            await self.agent.hold(adapter)
            self.agent.started(adapter)
        try:
            async with vllm.stream("POST", path, json=body, timeout=self._stream_timeout,
                                   headers={"x-request-id": request.request_id}) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise refusal(response, body["model"])
                if not chat:
                    yield BackendChunk("", 0, 0)  # accepted: vLLM validated the request before answering
                finished = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or finished:
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = self._chunk(data, chat)
                    if chunk is None:
                        continue
                    if chunk.finish_reason is not None:
                        finished = True
                    # a chat stream opens with the role and the prompt's count: the acceptance
                    yield chunk
                if not finished:
                    raise BackendUnavailable(f"vLLM at {self.url} ended a stream before its finish reason")
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"vLLM at {self.url}: {type(exc).__name__} mid-stream") from None
        finally:
            if adapter is not None:
                self.agent.finished(adapter)

    def _chunk(self, data: str, chat: bool) -> BackendChunk | None:
        try:
            event = json.loads(data)
        except ValueError:
            raise BackendUnavailable(f"vLLM at {self.url} sent an event that is not JSON") from None
        if not isinstance(event, dict):
            raise BackendUnavailable(f"vLLM at {self.url} sent an event that is not an object")
        if "error" in event:
            raise BackendUnavailable(f"vLLM at {self.url} failed mid-stream: {str(event['error'])[:200]}")
        usage = event.get("usage") or {}
        choices = event.get("choices") or []
        if not choices:
            return None  # the closing usage event: the last chunk already counted
        choice = choices[0]
        text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
        reason = choice.get("finish_reason")
        try:
            return BackendChunk(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                                None if reason is None else _FINISH.get(reason, "stop"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise BackendUnavailable(f"vLLM at {self.url} sent usage that is not counts") from None

    def abort(self, request_id: str) -> None:
        """Closing a request's stream aborts it in vLLM (it stops a request whose client left)."""

    # ---- tokenizing -----------------------------------------------------------------------------------
    async def tokenize(self, *, prompt: str | None = None, messages: Sequence[Message] | None = None,
                       add_special_tokens: bool = False, add_generation_prompt: bool = True,
                       with_strings: bool = False) -> Tokens:
        body: dict[str, Any] = {"model": self.served_model, "add_special_tokens": add_special_tokens,
                                "return_token_strs": with_strings}
        if messages is not None:
            body.update(messages=[{"role": m.role, "content": m.content} for m in messages],
                        add_generation_prompt=add_generation_prompt)
        else:
            body["prompt"] = prompt
        response = await self._send("POST", "/tokenize", json=body)
        if response.status_code != 200:
            raise refusal(response, self.served_model)
        try:
            answer = response.json()
            return Tokens([int(t) for t in answer["tokens"]], answer.get("token_strs"))
        except (ValueError, KeyError, TypeError):
            raise BackendUnavailable(f"vLLM at {self.url} sent tokens that are not a list") from None

    async def detokenize(self, ids: Sequence[int]) -> str:
        response = await self._send("POST", "/detokenize", json={"model": self.served_model, "tokens": list(ids)})
        if response.status_code != 200:
            error = refusal(response, self.served_model)
            if isinstance(error, BackendUnavailable) and response.status_code == 500:
                raise BadRequest("a token id is out of the vocabulary", param="tokens") from None
            raise error
        try:
            return str(response.json()["prompt"])
        except (ValueError, KeyError, TypeError):
            raise BackendUnavailable(f"vLLM at {self.url} sent a text that is not a string") from None

    def _queued(self) -> int:
        return self._waiting


def _names(label: str) -> tuple[str, ...]:
    return tuple(n for n in label.split(",") if n)
