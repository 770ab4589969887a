"""Errors any backend raises; the serving path maps them to HTTP in one place
(``serving.completions.api_error``).

Hierarchy::

    BackendError
    ├── BackendOverloaded      wait queue full (503 + Retry-After)
    ├── BackendUnavailable     not started, shutting down or unreachable (503)
    ├── BadRequest             a request this backend can never serve (400)
    │   └── ContextTooLong     prompt + max_tokens beyond the context window (400)
    ├── AdapterProblem         slot errors on load/unload (not found, full, rank, in use, invalid)
    └── Unsupported            an operation this kind of backend does not offer (tokenize on null)
"""
from __future__ import annotations


class BackendError(Exception):
    pass


class BackendOverloaded(BackendError):
    pass


class BackendUnavailable(BackendError):
    pass


class BadRequest(BackendError):
    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class ContextTooLong(BadRequest):
    pass


class AdapterProblem(BackendError):
    def __init__(self, message: str, adapter_id: str, kind: str) -> None:
        self.adapter_id = adapter_id
        self.kind = kind  # not_found | slots_full | rank_too_large | in_use | exists | invalid
        super().__init__(message)


class Unsupported(BackendError):
    pass
