"""Every error mapped to OpenAI's shape once, here at the edge: ours (``errors.ApiError``),
Starlette's routing errors (404, 405, 413) and a store that does not answer (503 with
Retry-After). Anything else is a bug, answered by the middleware's last-resort 500."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .. import errors
from ..store import StoreUnavailable
from .jsonresponse import JSONResponse

Handler = Callable[[Request, Exception], Awaitable[Response]]
_HTTP_ERRORS: dict[int, type[errors.ApiError]] = {404: errors.NotFound, 405: errors.MethodNotAllowed,
                                                 413: errors.PayloadTooLarge}


def error_response(request: Request, exc: errors.ApiError) -> JSONResponse:
    request.state.error_code = exc.code
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ApiError)
    return error_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = _HTTP_ERRORS.get(exc.status_code, errors.InvalidRequest)
    message = {404: f"Unknown request URL: {request.method} {request.url.path[:200]}.",
               405: f"Method {request.method} is not allowed on {request.url.path[:200]}."}.get(
        exc.status_code, str(exc.detail))
    error = kind(message)
    error.status = exc.status_code
    response = error_response(request, error)
    response.headers.update(exc.headers or {})
    return response


def exception_handlers(on_store_down: Callable[[StoreUnavailable], None],
                       retry_after_s: int) -> dict[type[Exception], Handler]:
    """Starlette's ``exception_handlers``; ``on_store_down`` hears of each store failure."""
    async def store_unavailable(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StoreUnavailable)
        on_store_down(exc)
        return error_response(request, errors.Overloaded(
            f"The gateway's {exc.store} store is unavailable; retry shortly.", code="store_unavailable",
            retry_after=retry_after_s))

    return {errors.ApiError: _api_error, HTTPException: _http_error, StoreUnavailable: store_unavailable}
