"""The OpenAI endpoints: the model list and the two completion endpoints, and vLLM's
``/tokenize`` and ``/detokenize`` beside them. Each handler names its caller and hands the
request to the serving path."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..protocol import responses as wire
from ..serving.completions import CompletionService
from ..serving.names import ModelNames
from ..serving.tokenizing import TokenizerService
from .callers import Callers
from .jsonresponse import JSONResponse


class OpenAiApi:
    def __init__(self, callers: Callers, names: ModelNames, completions: CompletionService,
                 tokenizer: TokenizerService) -> None:
        self.callers = callers
        self.names = names
        self.service = completions
        self.tokenizer = tokenizer

    async def list_models(self, request: Request) -> Response:
        principal = await self.callers.tenant(request)
        cards = [wire.model_card(t.model, t.created, t.owned_by) for t in await self.names.visible(principal)]
        return JSONResponse(wire.model_list(cards))

    async def get_model(self, request: Request) -> Response:
        principal = await self.callers.tenant(request)
        target = await self.names.resolve(request.path_params["model"], principal)
        return JSONResponse(wire.model_card(target.model, target.created, target.owned_by))

    async def chat_completions(self, request: Request) -> Response:
        return await self.service.chat(request, await self.callers.tenant(request))

    async def completions(self, request: Request) -> Response:
        return await self.service.complete(request, await self.callers.tenant(request))

    async def tokenize(self, request: Request) -> Response:
        return await self.tokenizer.tokenize(request, await self.callers.tenant(request))

    async def detokenize(self, request: Request) -> Response:
        return await self.tokenizer.detokenize(request, await self.callers.tenant(request))
