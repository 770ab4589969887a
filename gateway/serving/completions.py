"""Chat and text completions: parse, resolve the model, run the backend, answer as JSON or SSE.

A stream's status and headers go out once the request is *admitted*: authenticated, resolved,
within its quotas, holding a sequence slot on a chosen backend with its adapter resident there,
and accepted by that backend (validated, its prompt counted). Until then every refusal is a
status (400 context too long, 429, 503 no backend or overloaded, 504); after it, a failure is an
SSE error event (a backend lost before the first token is still replaced by another, once).
TTFT is measured to the first token either way. One guard per request (``RequestGuard``) sees
the client go or the deadline pass, whether the request is waiting for a backend to be ready
(a pool scaled to zero), for its adapter, its first token or is streaming; then the backend
stream is closed, which aborts the generation and frees its batch slot at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from cache import AdapterCache, CacheError, UnknownAdapter

from .. import errors
from ..api.bodies import read_json
from ..api.jsonresponse import JSONResponse
from ..backends import errors as backend_errors
from ..backends.base import BackendChunk, BackendRequest, Message, Sampling
from ..protocol import ChatRequest, CompletionRequest, parse_chat, parse_completion
from ..protocol import responses as wire
from ..tenancy.auth import Principal
from ..tenancy.quotas import Quotas
from ..tenancy.usage import UsageRecorder
from .auto import AUTO, AutoSelector, classified_text
from .fleet import Fleet, Held, Member, NoBackend, NotHonoured
from .names import ModelNames, Target
from .slotqueue import QueueFull
from .streaming import ChunkTemplate, ClientGone, EventStream, RequestGuard

log = logging.getLogger("tensafe.gateway")
T = TypeVar("T")
#: a started generation: its backend, the slot it holds, the stream and its first token
_Started = tuple[Member, Held, AsyncIterator[BackendChunk], BackendChunk | None]
DEFAULT_TOKEN_ESTIMATE = 256  # completion tokens charged up front when max_tokens is unset (refunded)
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def api_error(exc: backend_errors.BackendError, retry_after: int) -> errors.ApiError:
    """The one translation from backend errors to API errors."""
    if isinstance(exc, backend_errors.BackendOverloaded):
        return errors.Overloaded("The server is overloaded; retry shortly.", retry_after=retry_after)
    if isinstance(exc, backend_errors.ContextTooLong):
        return errors.InvalidRequest(f"This model's maximum context length was exceeded: {exc}.",
                                     param=exc.param, code="context_length_exceeded")
    if isinstance(exc, backend_errors.BadRequest):
        return errors.InvalidRequest(str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, backend_errors.AdapterProblem):
        return errors.Overloaded("The adapter is not available right now; retry shortly.",
                                 code="adapter_unavailable", retry_after=retry_after)
    return errors.Overloaded("The model backend is unavailable.", code="backend_unavailable",
                             retry_after=retry_after)


async def guarded(guard: RequestGuard, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` in the calling task unless the client disconnects (ClientGone) or the
    deadline passes (a 504); either way the awaitable is cancelled."""
    try:
        async with guard:
            return await awaitable
    except TimeoutError:
        raise errors.Timeout("The request timed out.", code="timeout") from None


class CompletionService:
    """Chat and text completions from the parsed body to the reply. A request is resolved
    (which model or adapter, within which limits), admitted (quotas, the adapter's slot) and
    started (the backend's first chunk), then answered as JSON or as a stream."""

    def __init__(self, fleet: Fleet, names: ModelNames, *, max_body_bytes: int, request_timeout_s: float,
                 retry_after_s: int, cache: AdapterCache | None = None, quotas: Quotas | None = None,
                 usage: UsageRecorder | None = None, auto: AutoSelector | None = None) -> None:
        self.fleet = fleet
        self.auto = auto
        self.names = names
        self.max_body_bytes = max_body_bytes
        self.timeout = request_timeout_s
        self.retry_after = retry_after_s
        self.cache = cache
        self.quotas = quotas
        self.usage = usage

    async def chat(self, request: Request, principal: Principal) -> Response:
        """``POST /v1/chat/completions``."""
        params = parse_chat(await read_json(request, self.max_body_bytes))
        messages = tuple(Message(m.role, m.content) for m in params.messages)  # type: ignore[arg-type]
        size = sum(len(m.content) for m in messages)
        return await self._run(request, principal, params, "chatcmpl-", dict(messages=messages), size)

    async def complete(self, request: Request, principal: Principal) -> Response:
        """``POST /v1/completions``."""
        params = parse_completion(await read_json(request, self.max_body_bytes))
        size = len(params.prompt or "") + 4 * len(params.prompt_token_ids or ())
        return await self._run(request, principal, params, "cmpl-",
                               dict(prompt=params.prompt, prompt_token_ids=params.prompt_token_ids), size)

    async def _run(self, request: Request, principal: Principal, params: ChatRequest | CompletionRequest,
                   prefix: str, inputs: dict[str, Any], prompt_chars: int) -> Response:
        state = request.state
        deadline = time.monotonic() + self.timeout
        if params.ignored:
            state.ignored_fields = list(params.ignored)
            log.info("request %s: ignored fields not defined by OpenAI: %s", state.request_id,
                     ", ".join(f[:64] for f in params.ignored[:20]))
        headers: dict[str, str] = {}
        target = await self._resolve(request, principal, params.model, inputs, headers)
        max_tokens = _max_tokens(params.max_tokens, principal)
        if max_tokens is not None and params.min_tokens > max_tokens:
            raise errors.InvalidRequest(f"min_tokens {params.min_tokens} exceeds max_tokens {max_tokens}.",
                                        param="min_tokens", code="invalid_value")
        sampling = Sampling(max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                            seed=params.seed, stop=params.stop, ignore_eos=params.ignore_eos,
                            min_tokens=params.min_tokens, top_k=params.top_k,
                            repetition_penalty=params.repetition_penalty, stop_token_ids=params.stop_token_ids)
        # everything this request holds, released in reverse order when it ends however it ends
        resources = contextlib.AsyncExitStack()
        guard = RequestGuard(request.receive, deadline)
        resources.callback(guard.stop)
        tally = _Tally()
        rid = prefix + os.urandom(16).hex()
        try:
            await self._admit(principal, target, prompt_chars // 3 + 1 + (max_tokens or DEFAULT_TOKEN_ESTIMATE),
                              guard, resources, tally)
            breq = BackendRequest(request_id=rid, sampling=sampling, adapter_id=target.adapter_id,
                                  cache_salt=principal.tenant or "", **inputs)
            tally.started = time.perf_counter()
            steps = self._dispatch(state, principal, target, breq, prompt_chars // 3 + 1, resources)
            resources.push_async_callback(steps.aclose)
            await guarded(guard, anext(steps))  # admitted and accepted
            if not params.stream:
                started = await guarded(guard, anext(steps))
        except ClientGone:
            await resources.aclose()
            state.error_code = "client_disconnected"
            return Response(status_code=499)
        except BaseException:
            await resources.aclose()
            raise
        if target.adapter_id:
            headers["x-tensafe-adapter"] = wire.header_text(target.model)
        created = int(time.time())
        chat = isinstance(params, ChatRequest)
        done = functools.partial(self._account, state, principal, target, tally)
        if params.stream:
            return self._stream(request, steps, chat, rid, created, target, params.include_usage, guard, resources,
                                done, tally, headers)
        member, held, stream, first = started
        tally.first(state)
        last = None
        try:
            text, last = await guarded(guard, _collect(stream, first, held))
        except ClientGone:
            state.error_code = "client_disconnected"
            return Response(status_code=499)
        except backend_errors.BackendError as exc:
            raise self._failed(member, exc) from None
        finally:
            done(last)
            await resources.aclose()
        reason = _finish(last)
        body = (wire.chat_completion if chat else wire.completion)(
            rid, created, target.model, text, reason, last.prompt_tokens, last.completion_tokens)
        return JSONResponse(body, headers=headers)

    async def _resolve(self, request: Request, principal: Principal, model: str, inputs: dict[str, Any],
                       headers: dict[str, str]) -> Target:
        """What ``model`` names for this caller (for ``auto``, what the expert table picks: its
        adapter starts loading at once, while the request is admitted)."""
        state = request.state
        if model == AUTO and self.auto is not None:
            target = await self._auto_target(request, principal, inputs)
            if state.expert:
                headers["x-tensafe-expert"] = wire.header_text(state.expert)
            if target.tenant_adapter and self.cache is not None:
                self.cache.prefetch(target.adapter_id)  # into the CPU tier; the chosen backend loads it
        else:
            target = await self.names.resolve(model, principal)
        state.model, state.adapter = target.model, target.model if target.adapter_id else None
        return target

    async def _admit(self, principal: Principal, target: Target, estimate: int, guard: RequestGuard,
                     resources: contextlib.AsyncExitStack, tally: "_Tally") -> None:
        """Take the tenant's quotas (``estimate`` tokens, refunded to what was used), released
        with ``resources``."""
        if self.quotas is not None and principal.tenant is not None:
            admission = await self.quotas.admit(principal.tenant, principal.limits, estimate)
            resources.push_async_callback(lambda: admission.release(tally.tokens))

    async def _dispatch(self, state: Any, principal: Principal, target: Target, breq: BackendRequest,
                        input_estimate: int, resources: contextlib.AsyncExitStack) -> AsyncIterator[_Started | None]:
        """Choose a backend (waiting for one while none is ready: ``Fleet.choose_held``), wait
        for one of its sequence slots, make the adapter resident there and start the
        generation: yields None once a backend has accepted the request, then the backend, the
        held slot, the stream and its first token. A backend that is down or fails before the
        first token is counted against its breaker and the request goes to another one, once
        (without waiting). The caller bounds each step (its guard: a disconnect or the deadline
        ends a wait for a backend too); what an attempt holds is released with ``resources``,
        or at once when the attempt fails."""
        tried: frozenset[str] = frozenset()
        needs = breq.sampling.extensions()
        accepted = False
        while True:
            try:
                if tried:
                    member, choice = self.fleet.choose(target.adapter_id, target.rank, exclude=tried, needs=needs)
                else:
                    member, choice = await self.fleet.choose_held(target.adapter_id, target.rank, needs=needs)
            except NotHonoured as exc:
                raise errors.InvalidRequest(f"The parameter '{exc.parameter}' is not supported by the backends "
                                            "serving this model.", param=exc.parameter,
                                            code="unsupported_parameter") from None
            except NoBackend as exc:
                raise errors.Overloaded(f"No model backend can take the request now ({exc.why}); retry shortly.",
                                        code="no_backend", retry_after=self.retry_after) from None
            state.pool, state.backend = member.pool, member.name
            state.dispatch = "failover" if tried else choice.reason
            attempt = contextlib.AsyncExitStack()
            resources.push_async_callback(attempt.aclose)  # a no-op once the attempt is closed
            try:
                held = await attempt.enter_async_context(self.fleet.slot(
                    member, target.adapter_id, principal.tenant or "", principal.limits.weight, input_estimate))
                if target.tenant_adapter and self.cache is not None:
                    await attempt.enter_async_context(self._lease(target, member.name))
                stream = aiter(member.backend.generate(breq))
                attempt.push_async_callback(stream.aclose)
                first = await anext(stream, None)
                if first is not None and _is_acceptance(first):
                    if not accepted:
                        accepted = True
                        yield None
                    first = await anext(stream, None)
                elif not accepted:
                    accepted = True
                    yield None
            except QueueFull:
                await attempt.aclose()
                raise errors.Overloaded("The server is overloaded; retry shortly.",
                                        retry_after=self.retry_after) from None
            except backend_errors.BackendUnavailable as exc:
                await attempt.aclose()
                member.breaker.failure()
                if tried:
                    raise api_error(exc, self.retry_after) from None
                log.warning("backend %s failed before the first token (%s); trying another", member.key, exc)
                tried = tried | {member.name}
                continue
            except backend_errors.BackendError as exc:
                await attempt.aclose()
                member.breaker.success()  # it answered: the request, not the backend, was refused
                raise api_error(exc, self.retry_after) from None
            except BaseException:
                member.breaker.cancelled()
                await attempt.aclose()
                raise
            break
        member.breaker.success()
        if first is not None:
            held.generated(first.completion_tokens)
        yield member, held, stream, first

    def _failed(self, member: Member, exc: backend_errors.BackendError) -> errors.ApiError:
        """A backend error after the first token: the backend's breaker hears of an outage."""
        if isinstance(exc, backend_errors.BackendUnavailable):
            member.breaker.failure()
        return api_error(exc, self.retry_after)

    async def _auto_target(self, request: Request, principal: Principal, inputs: dict[str, Any]) -> Target:
        assert self.auto is not None
        if inputs.get("prompt_token_ids") is not None:
            raise errors.InvalidRequest("model 'auto' needs a text prompt, not token ids.", param="prompt",
                                        code="invalid_value")
        decision = await self.auto.decide(principal.tenant, classified_text(inputs.get("messages"),
                                                                         inputs.get("prompt")))
        request.state.expert = decision.expert
        request.state.route_method = decision.method
        name = decision.adapter or self.names.base.model
        try:
            return await self.names.resolve(name, principal)
        except errors.ModelNotFound:
            log.warning("expert %s names adapter %s, which does not exist; serving the base model",
                        decision.expert, name[:64])
            return self.names.base

    @contextlib.asynccontextmanager
    async def _lease(self, target: Target, backend: str) -> AsyncIterator[None]:
        """Keep the tenant adapter resident in a slot of ``backend`` for the whole request."""
        assert self.cache is not None and target.adapter_id is not None
        try:
            lease = self.cache.lease(target.adapter_id, backend)
            await lease.__aenter__()
        except UnknownAdapter:
            raise errors.ModelNotFound(target.model) from None
        except CacheError as exc:
            log.warning("adapter %s unavailable: %s", target.adapter_id, exc)
            raise errors.Overloaded("The adapter cannot be loaded right now; retry shortly.",
                                    code="adapter_unavailable", retry_after=self.retry_after) from None
        try:
            yield
        finally:
            await lease.__aexit__(None, None, None)

    def _account(self, state: Any, principal: Principal, target: Target, tally: "_Tally",
                 last: BackendChunk | None) -> None:
        if last is None or tally.counted:
            return
        tally.counted = True
        tally.tokens = last.prompt_tokens + last.completion_tokens
        state.prompt_tokens, state.completion_tokens = last.prompt_tokens, last.completion_tokens
        state.finish_reason = last.finish_reason
        if last.completion_tokens > 1 and tally.first_at:
            state.itl_ms = round((time.perf_counter() - tally.first_at) * 1000 / (last.completion_tokens - 1), 3)
        if self.usage is not None and principal.tenant is not None:
            self.usage.add(principal.tenant, target.model, last.prompt_tokens, last.completion_tokens,
                           principal.incarnation)

    async def _events(self, request: Request, steps: AsyncIterator[Any], tally: "_Tally",
                      render: Callable[[BackendChunk, bool], bytes], usage: Callable[[BackendChunk], bytes] | None,
                      done: Callable[[BackendChunk | None], None]) -> AsyncIterator[bytes]:
        """The SSE events of one stream, from its first token on (the response enforces the
        deadline and disconnects). The finishing chunk, the usage chunk and ``[DONE]`` are one
        event: one write. A failure after the headers is an error event."""
        last = None
        state = request.state
        try:
            try:
                member, held, stream, first = await anext(steps)
            except errors.ApiError as error:
                state.error_code, state.status = error.code, error.status
                yield wire.sse(error.body())
                return
            tally.first(state)
            chunk, last, is_first = first, first, True
            while chunk is not None:
                last = chunk
                event = render(chunk, is_first)
                is_first = False
                if chunk.finish_reason is not None:
                    break
                yield event
                try:
                    chunk = await anext(stream, None)
                    if chunk is not None:
                        held.generated(chunk.completion_tokens)
                except backend_errors.BackendError as exc:
                    error = self._failed(member, exc)
                    state.error_code, state.status = error.code, error.status
                    yield wire.sse(error.body())
                    return
            else:
                event = b""  # the backend ended without a finish reason
            yield event + (usage(last) if usage is not None and last is not None else b"") + wire.DONE
        finally:
            done(last)

    def _stream(self, request: Request, steps: AsyncIterator[Any], chat: bool, rid: str, created: int,
                target: Target, include_usage: bool, guard: RequestGuard, resources: contextlib.AsyncExitStack,
                done: Callable[[BackendChunk | None], None], tally: "_Tally", headers: dict[str, str]) -> EventStream:
        model = target.model
        template = ChunkTemplate("chat.completion.chunk" if chat else "text_completion", rid, created, model,
                                 include_usage)

        def render(chunk: BackendChunk, is_first: bool) -> bytes:
            reason = _finish(chunk) if chunk.finish_reason else None
            return template.chat(chunk.text, is_first, reason) if chat else template.completion(chunk.text, reason)

        usage_chunk = wire.chat_usage_chunk if chat else wire.completion_usage_chunk
        usage = (lambda c: wire.sse(usage_chunk(rid, created, model, c.prompt_tokens, c.completion_tokens))) \
            if include_usage else None

        def timed_out() -> bytes:
            request.state.error_code, request.state.status = "timeout", errors.Timeout.status
            return wire.sse(errors.Timeout("The request timed out.", code="timeout").body())

        def gone() -> None:
            request.state.error_code, request.state.status = "client_disconnected", 499

        events = self._events(request, steps, tally, render, usage, done)
        return EventStream(events, guard=guard, on_timeout=timed_out, on_gone=gone, final=wire.DONE,
                           on_close=resources.aclose, headers={**SSE_HEADERS, **headers})


def _max_tokens(requested: int | None, principal: Principal) -> int | None:
    """The request's ``max_tokens`` within the tenant's per-request cap (the cap when unset)."""
    cap = principal.limits.max_tokens
    if cap is None:
        return requested
    if requested is not None and requested > cap:
        raise errors.InvalidRequest(f"max_tokens {requested} exceeds your per-request limit of {cap}.",
                                    param="max_tokens", code="max_tokens_limit")
    return requested or cap


@dataclasses.dataclass
class _Tally:
    tokens: int = 0
    counted: bool = False
    started: float = 0.0  # when dispatch began
    first_at: float = 0.0  # when the first token came

    def first(self, state: Any) -> None:
        self.first_at = time.perf_counter()
        state.ttft_ms = round((self.first_at - self.started) * 1000, 3)


def _is_acceptance(chunk: BackendChunk) -> bool:
    return chunk.completion_tokens == 0 and chunk.finish_reason is None and not chunk.text


async def _collect(stream: AsyncIterator[BackendChunk], first: BackendChunk | None,
                   held: Held) -> tuple[str, BackendChunk]:
    if first is None:
        raise errors.ApiError("The backend ended the stream without a result.", code="backend_error")
    parts, last = [first.text], first
    while last.finish_reason is None:
        chunk = await anext(stream, None)
        if chunk is None:
            break
        held.generated(chunk.completion_tokens)
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


def _finish(chunk: BackendChunk) -> str:
    # "abort" only happens when we stopped it ourselves (timeout, shutdown); report it as length
    return "stop" if chunk.finish_reason == "stop" else "length"
