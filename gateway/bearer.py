"""Bearer tokens for the gateway's own services (``tensafe worker``, ``tensafe agent``): several
at once so one can be rotated (add the new one to every server, move the gateways to it, drop
the old one), compared in constant time.

A pure ASGI middleware in front of the routes: a request without a valid token never reaches
them, whatever its path, except the open ``/health``. A token is never logged, echoed or kept
in a repr.
"""
from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health"})
#: set in the scope of a request that presented a valid token
AUTHENTICATED = "tensafe.authenticated"


def _refusal(service: str) -> bytes:
    return json.dumps({"error": {"kind": "unauthorized", "message": f"a valid {service} token is required "
                                 "(Authorization: Bearer <token>)", "param": None, "adapter_id": None,
                                 "reason": None}}).encode()


def parse_tokens(spec: str) -> tuple[str, ...]:
    """``worker_tokens``/``agent_tokens`` (comma-separated) -> the tokens, blanks dropped."""
    return tuple(t for t in (part.strip() for part in spec.split(",")) if t)


class TokenGate:
    def __init__(self, app: ASGIApp, tokens: tuple[str, ...], service: str = "worker") -> None:
        if not tokens:
            raise ValueError(f"a {service} needs at least one token")
        self.app = app
        self._tokens = tuple(b"Bearer " + t.encode() for t in tokens)
        self._refusal = _refusal(service)

    def __repr__(self) -> str:
        return f"TokenGate({len(self._tokens)} tokens)"

    def accepts(self, header: bytes) -> bool:
        # every token is compared, so the time taken does not tell which one came close
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(header, token)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if self.accepts(header):
            scope[AUTHENTICATED] = True
        elif scope["path"] not in OPEN_PATHS:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(self._refusal)).encode()),
                                    (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": self._refusal, "more_body": False})
            return
        await self.app(scope, receive, send)
