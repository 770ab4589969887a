"""Errors the API returns, in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Hierarchy (each with its HTTP status and OpenAI ``type``)::

    ApiError                       500 server_error
    ├── InvalidRequest             400 invalid_request_error
    │   └── PayloadTooLarge        413 invalid_request_error
    ├── AuthenticationFailed       401 authentication_error
    ├── PermissionDenied           403 permission_error
    ├── NotFound                   404 not_found_error
    │   └── ModelNotFound          404 not_found_error, code model_not_found
    ├── MethodNotAllowed           405 invalid_request_error
    ├── Conflict                   409 invalid_request_error
    ├── RateLimited                429 rate_limit_exceeded (+ Retry-After)
    ├── Unimplemented              501 server_error, code not_implemented
    ├── Overloaded                 503 server_error (+ Retry-After)
    └── Timeout                    504 server_error

Errors are mapped to HTTP once, at the edge (``api.exceptions``); ``type``/``code`` are stable
and double as metrics labels. Messages never carry secrets.
"""
from __future__ import annotations


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)} if self.retry_after is not None else {}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class AuthenticationFailed(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ApiError):
    status = 403
    type = "permission_error"
    code = "insufficient_scope"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model[:200]}' does not exist or you do not have access to it.", param="model")


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class Unimplemented(ApiError):
    status = 501
    type = "server_error"
    code = "not_implemented"


class Overloaded(ApiError):
    status = 503
    type = "server_error"
    code = "overloaded"


class Timeout(ApiError):
    status = 504
    type = "server_error"
    code = "timeout"
