"""Request bodies, read once and bounded: raw bytes (uploads), JSON (the OpenAI endpoints) and
JSON objects (the tenant and admin APIs), plus the few body fields those APIs share."""
from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from . import errors


async def read_body(request: Request, limit: int, what: str = "Request body") -> bytes:
    """The body, refused with a 413 as soon as it (or its declared length) passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.PayloadTooLarge(f"{what} of {declared} bytes exceeds the limit of {limit} bytes.")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise errors.PayloadTooLarge(f"{what} exceeds the limit of {limit} bytes.")
    return bytes(body)


async def read_json(request: Request, limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidRequest("We could not parse the JSON body of your request. The body must be valid "
                                    "JSON.", code="invalid_json") from None


async def read_object(request: Request, limit: int) -> dict[str, Any]:
    body = await read_json(request, limit)
    if not isinstance(body, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    return body


def scopes_field(body: dict[str, Any]) -> tuple[str, ...]:
    """``scopes`` of a key request (default: the plain tenant scope)."""
    scopes = body.get("scopes", ["tenant"])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise errors.InvalidRequest("Invalid 'scopes': expected an array of strings.", param="scopes",
                                    code="invalid_type")
    return tuple(scopes)
