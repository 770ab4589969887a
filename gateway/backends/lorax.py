"""A Backend over one LoRAX server's REST API and the ``tensafe agent`` beside it.

The protocol followed is LoRAX's router at predibase/lorax a7394ba (router/src/lib.rs for the
request and response types, router/src/server.rs for the routes, the SSE framing and the error
statuses, router/src/infer.rs for the error kinds):

- ``POST /generate_stream`` with ``{"inputs": text, "parameters": {...}}``; every event is one
  ``data: {json}`` line: ``{"token": {"id", "text", "logprob", "special"}, "generated_text",
  "details"}``, the last one with ``generated_text`` and, as we always ask ``details: true``,
  ``details: {"finish_reason": "length" | "eos_token" | "stop_sequence", "prompt_tokens",
  "generated_tokens", "seed"}``. No ``[DONE]``: the stream ends after it. The status is 200
  even for a refused request: failures come as one ``{"error", "error_type"}`` event
  (``validation``, ``overloaded``, ``generation``: adapter download and load failures among
  them, ``incomplete_generation``).
- ``GET /info`` (``model_id``, ``max_total_tokens``, ``max_stop_sequences``,
  ``max_concurrent_requests``) and ``GET /health`` (200, or 503 when unhealthy).
- LoRAX takes text only, so chat messages are rendered here with the base model's own chat
  template, and prompts are counted with its tokenizer (the same as LoRAX's). Token-id prompts
  are refused.
- Adapters: the agent writes them into the memory-backed directory it shares with LoRAX, and a
  request names the adapter's directory with ``adapter_source: "local"``; LoRAX loads it on
  first use. LoRAX lists no adapters, so which are active there is kept from our own dispatch:
  the ``max_active_adapters`` most recently used.
- Of vLLM's sampling extensions LoRAX has ``ignore_eos_token``, ``top_k`` and
  ``repetition_penalty``; ``min_tokens`` and ``stop_token_ids`` are refused by the fleet.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import posixpath
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx

from ..periodic import Periodic
from .agent_link import AgentBacked, AgentLink
from .base import BackendChunk, BackendRequest, Message, Tokens
from .calls import response_json
from .errors import AdapterProblem, BackendError, BackendOverloaded, BackendUnavailable, BadRequest, ContextTooLong

log = logging.getLogger("tensafe.gateway")
EXTENSIONS = frozenset({"ignore_eos", "top_k", "repetition_penalty"})
_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}
#: words of LoRAX's adapter failures (sources/local.py, adapters/__init__.py, loader.rs)
_ADAPTER_WORDS = ("adapter", "No local weights", "prefix filtering", "Invalid source")


def lorax_error(event: Mapping[str, Any], adapter_id: str | None) -> BackendError:
    """The backend error a LoRAX error body or event stands for."""
    message = str(event.get("error", ""))[:500]
    kind = event.get("error_type")
    if kind == "validation":
        if "max_total_tokens" in message or "must have less than" in message or "tokens + `max_new_tokens`" in message:
            return ContextTooLong(message, param="max_tokens")
        return BadRequest(message)
    if kind == "overloaded":
        return BackendOverloaded(f"LoRAX: {message}")
    if kind == "generation" and adapter_id is not None and any(w in message for w in _ADAPTER_WORDS):
        return AdapterProblem(f"LoRAX could not load adapter {adapter_id!r}: {message}", adapter_id, "invalid")
    return BackendUnavailable(f"LoRAX failed ({kind}): {message}")


class ChatTemplate:
    """The base model's tokenizer and chat template (transformers), loaded once, off the loop."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self._tokenizer: Any = None

    async def load(self) -> None:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self._tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                   add_generation_prompt=add_generation_prompt, tokenize=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def strings(self, ids: Sequence[int]) -> list[str]:
        return list(self._tokenizer.convert_ids_to_tokens(list(ids)))

    def decode(self, ids: Sequence[int]) -> str:
        vocab = len(self._tokenizer)
        if any(not 0 <= i < vocab for i in ids):
            raise BadRequest("a token id is out of the vocabulary", param="tokens")
        return self._tokenizer.decode(list(ids))


class LoraxBackend(AgentBacked):
    KIND = "LoRAX"

    def __init__(self, url: str, agent_url: str, *, name: str, served_model: str, tokenizer_dir: str,
                 agent_token: str = "", holder: str | None = None, max_num_seqs: int = 32, max_queue: int = 256,
                 max_lora_rank: int = 16, max_active_adapters: int = 0, adapter_root: str = "",
                 model_config: dict[str, Any] | None = None, timeout_s: float = 10.0, connect_timeout_s: float = 2.0,
                 stream_timeout_s: float = 600.0, refresh_s: float = 0.5, lease_ttl_s: float = 30.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.name = name
        self.extensions = EXTENSIONS
        self.url = str(httpx.URL(url)).rstrip("/")
        self.served_model = served_model
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.max_lora_rank = max_lora_rank
        #: LoRAX's --max-active-adapters (its /info does not say); 0: as many as the agent holds
        self.max_active_adapters = max_active_adapters
        #: where LoRAX sees the agent's directory, when it is mounted elsewhere than in the agent
        self.adapter_root = adapter_root
        self._model_config = model_config
        self.template = ChatTemplate(tokenizer_dir)
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._stream_timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s, read=stream_timeout_s)
        self._http_client: httpx.AsyncClient | None = None
        self._http_headers: dict[str, str] = {}
        self._verify = verify
        self.agent = AgentLink(agent_url, backend=name, token=agent_token, holder=holder, timeout=self._timeout,
                               lease_ttl_s=lease_ttl_s, verify=verify)
        self.agent_url = self.agent.url
        self._refresher = Periodic(f"refresh-{name}", refresh_s, self._refresh)
        self._running = 0  # streams open to LoRAX (past max_num_seqs: queued there)
        self._active: collections.OrderedDict[str, None] = collections.OrderedDict()  # most recent last
        self.max_model_len = 0
        self.max_stop_sequences = 4
        self._reachable = False

    def __repr__(self) -> str:
        return f"LoraxBackend({self.url!r}, agent={self.agent_url!r}, name={self.name!r})"

    # ---- state ------------------------------------------------------------------------------------
    async def _connect(self) -> None:
        await self.template.load()
        response = await self._send("GET", "/info")
        info = response_json(response)
        if response.status_code != 200 or not isinstance(info, dict):
            raise BackendUnavailable(f"LoRAX at {self.url} answered {response.status_code} for /info")
        try:
            self.max_model_len = int(info["max_total_tokens"])
            self.max_stop_sequences = int(info.get("max_stop_sequences", 4))
            self.max_num_seqs = min(self.max_num_seqs, int(info.get("max_concurrent_requests") or self.max_num_seqs))
        except (KeyError, TypeError, ValueError):
            raise BackendUnavailable(f"LoRAX at {self.url} sent an /info that is not LoRAX's") from None

    async def _refresh_state(self) -> None:
        await super()._refresh_state()
        for gone in [a for a in self._active if a not in self.agent.paths]:  # the agent let it go
            del self._active[gone]

    # ---- generation -------------------------------------------------------------------------------
    def _inputs(self, request: BackendRequest) -> str:
        if request.messages is not None:
            return self.template.render(request.messages)
        if request.prompt is not None:
            return request.prompt
        raise BadRequest(f"backend {self.name} (LoRAX) takes text prompts, not token ids", param="prompt")

    def _parameters(self, request: BackendRequest) -> dict[str, Any]:
        s = request.sampling
        p: dict[str, Any] = {"details": True}
        if s.max_tokens is not None:
            p["max_new_tokens"] = s.max_tokens
        if s.temperature > 0:  # LoRAX samples only when asked; 0 is greedy as OpenAI means it
            p.update(do_sample=True, temperature=s.temperature)
            if s.top_p < 1.0:
                p["top_p"] = s.top_p
            if s.top_k > 0:
                p["top_k"] = s.top_k
        if s.seed is not None:
            p["seed"] = s.seed
        if s.stop:
            if len(s.stop) > self.max_stop_sequences:
                raise BadRequest(f"backend {self.name} (LoRAX) takes at most {self.max_stop_sequences} stop "
                                 "sequences", param="stop")
            p["stop"] = list(s.stop)
        if s.ignore_eos:
            p["ignore_eos_token"] = True
        if s.repetition_penalty != 1.0:
            p["repetition_penalty"] = s.repetition_penalty
        if request.adapter_id is not None:
            path = self.agent.paths.get(request.adapter_id)
            if not path:
                raise AdapterProblem(f"adapter {request.adapter_id!r} is not held by the agent of {self.name}",
                                     request.adapter_id, "not_found")
            if self.adapter_root:
                path = posixpath.join(self.adapter_root, posixpath.basename(path))
            p.update(adapter_id=path, adapter_source="local")
        return p

    async def generate(self, request: BackendRequest) -> AsyncIterator[BackendChunk]:
        client = self._http()
        adapter = request.adapter_id
        inputs = self._inputs(request)
        body = {"inputs": inputs, "parameters": self._parameters(request)}
        prompt_tokens = len(self.template.encode(inputs))
        if adapter is not None:
            await self.agent.hold(adapter)
            self.agent.started(adapter)
            self._active.pop(adapter, None)
            self._active[adapter] = None
        self._running += 1
        try:
            async with client.stream("POST", "/generate_stream", json=body, timeout=self._stream_timeout,
                                     headers={"x-request-id": request.request_id}) as response:
                if response.status_code != 200:  # before the handler: a body LoRAX could not read
                    await response.aread()
                    raise BadRequest(f"LoRAX answered {response.status_code}: {response.text[:300]}")
                yield BackendChunk("", prompt_tokens, 0)  # accepted; a refusal still comes as the first event
                generated = 0
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators and keep-alive comments
                    event = _event(line[5:], self.url)
                    if "error" in event:
                        raise lorax_error(event, adapter)
                    token = event.get("token") or {}
                    generated += 1
                    text = "" if token.get("special") else str(token.get("text") or "")
                    details = event.get("details")
                    if event.get("generated_text") is None:
                        yield BackendChunk(text, prompt_tokens, generated)
                        continue
                    if not isinstance(details, dict):
                        raise BackendUnavailable(f"LoRAX at {self.url} ended a stream without its details")
                    reason = _FINISH.get(str(details.get("finish_reason")), "stop")
                    try:
                        yield BackendChunk(text, int(details["prompt_tokens"]), int(details["generated_tokens"]),
                                           reason)  # type: ignore[arg-type]
                    except (KeyError, TypeError, ValueError):
                        raise BackendUnavailable(f"LoRAX at {self.url} sent details that are not counts") from None
                    return
                raise BackendUnavailable(f"LoRAX at {self.url} ended a stream before its last event")
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"LoRAX at {self.url}: {type(exc).__name__} mid-stream") from None
        finally:
            self._running -= 1
            if adapter is not None:
                self.agent.finished(adapter)

    def abort(self, request_id: str) -> None:
        """Closing a request's stream ends it in LoRAX (its router drops a stream whose client left)."""

    # ---- tokenizing -----------------------------------------------------------------------------------
    async def tokenize(self, *, prompt: str | None = None, messages: Sequence[Message] | None = None,
                       add_special_tokens: bool = False, add_generation_prompt: bool = True,
                       with_strings: bool = False) -> Tokens:
        text = self.template.render(messages, add_generation_prompt) if messages is not None else prompt or ""
        ids = self.template.encode(text, add_special_tokens=add_special_tokens)
        return Tokens(ids, self.template.strings(ids) if with_strings else None)

    async def detokenize(self, ids: Sequence[int]) -> str:
        return self.template.decode(ids)

    # ---- adapters -------------------------------------------------------------------------------------
    async def unload_adapter(self, adapter_id: str) -> None:
        await super().unload_adapter(adapter_id)
        self._active.pop(adapter_id, None)

    @property
    def active_adapters(self) -> tuple[str, ...]:
        """The adapters LoRAX most likely has active: the most recently used it can hold."""
        held = [a for a in self._active if a in self.agent.paths]
        limit = self.max_active_adapters or len(held)
        return tuple(held[-limit:]) if limit else ()

    def _queued(self) -> int:
        return max(0, self._running - self.max_num_seqs)  # sent past our slots: queued in LoRAX


def _event(data: str, url: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise BackendUnavailable(f"LoRAX at {url} sent an event that is not JSON") from None
    if not isinstance(event, dict):
        raise BackendUnavailable(f"LoRAX at {url} sent an event that is not an object")
    return event
