"""Request bodies at the edge of the gateway's own services (worker, agent): read whole but
bounded, and JSON parsed strictly. Errors of that edge (what a backend refuses travels as
:mod:`gateway.backends.errors`, see ``wire``): ``BodyTooLarge``, a body past its limit (413)."""
from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from ..backends.errors import BadRequest


class BodyTooLarge(Exception):
    def __init__(self, limit: int, size: int | None = None) -> None:
        self.limit = limit
        self.size = size
        said = f"of {size} bytes " if size is not None else ""
        super().__init__(f"request body {said}exceeds the limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (BodyTooLarge) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit, int(declared))
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(part)
    return b"".join(parts)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise BadRequest("the body is not valid JSON") from None
