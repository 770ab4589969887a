"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's): the base model's tokenizer, on the
least busy backend that has one. ``model`` must be one the caller may use (the base model, one
of its adapters, ``auto``); an adapter shares the base model's tokenizer. No sequence slot is
taken: tokenizing is cheap next to generating, and runs off the event loop."""
from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response

from .. import errors
from ..api.bodies import read_json
from ..api.jsonresponse import JSONResponse
from ..backends import errors as backend_errors
from ..backends.base import Message
from ..protocol.tokenize import parse_detokenize, parse_tokenize, tokenize_answer
from ..tenancy.auth import Principal
from .auto import AUTO
from .fleet import Fleet, Member
from .names import ModelNames

log = logging.getLogger("tensafe.gateway")


class TokenizerService:
    def __init__(self, fleet: Fleet, names: ModelNames, *, max_body_bytes: int, retry_after_s: int) -> None:
        self.fleet = fleet
        self.names = names
        self.max_body_bytes = max_body_bytes
        self.retry_after = retry_after_s

    async def tokenize(self, request: Request, principal: Principal) -> Response:
        params = parse_tokenize(await read_json(request, self.max_body_bytes))
        await self._model(request, params.model, principal)
        if params.ignored:
            request.state.ignored_fields = list(params.ignored)
        messages = None if params.messages is None else [Message(m.role, m.content)  # type: ignore[arg-type]
                                                         for m in params.messages]

        async def call(member: Member) -> Response:
            tokens = await member.backend.tokenize(
                prompt=params.prompt, messages=messages, add_special_tokens=params.add_special_tokens,
                add_generation_prompt=params.add_generation_prompt, with_strings=params.return_token_strs)
            return JSONResponse(tokenize_answer(tokens.ids, tokens.strings, member.max_model_len))

        return await self._on_a_backend(request, call)

    async def detokenize(self, request: Request, principal: Principal) -> Response:
        params = parse_detokenize(await read_json(request, self.max_body_bytes))
        await self._model(request, params.model, principal)

        async def call(member: Member) -> Response:
            return JSONResponse({"prompt": await member.backend.detokenize(params.tokens)})

        return await self._on_a_backend(request, call)

    async def _model(self, request: Request, model: str, principal: Principal) -> None:
        target = self.names.base if model == AUTO else await self.names.resolve(model, principal)
        request.state.model = target.model

    async def _on_a_backend(self, request: Request, call) -> Response:
        """``call`` on the least busy backend that can tokenize (the next one when a backend is
        down or has no tokenizer)."""
        members = self.fleet.idlest()
        down = not members
        for member in members:
            request.state.pool, request.state.backend = member.pool, member.name
            try:
                return await call(member)
            except backend_errors.Unsupported:
                pass
            except backend_errors.BadRequest as exc:
                raise errors.InvalidRequest(str(exc), param=exc.param, code="invalid_value") from None
            except backend_errors.BackendError as exc:
                down = True
                log.warning("backend %s could not tokenize: %s", member.key, exc)
        if not down:
            raise errors.Unimplemented("Tokenizing is not available on this server's backends.")
        raise errors.Overloaded("No model backend can tokenize now; retry shortly.", code="no_backend",
                                retry_after=self.retry_after)
