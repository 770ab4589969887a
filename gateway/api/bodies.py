"""Request bodies, read once and bounded: raw bytes (uploads), JSON (the OpenAI endpoints) and
JSON objects (the tenant and admin APIs), plus the few body fields those APIs share.

JSON is checked at the edge, so nothing behind it meets what would break it later: nesting
deeper than ``MAX_JSON_DEPTH`` (a recursion error in any recursive code, ours or a
library's), ``NaN``/``Infinity`` and numbers beyond a float's range (``1e400``; none is
JSON), and strings with a lone surrogate (``"\\ud800"``,
which JSON's escapes can express but UTF-8 cannot: the tokenizer and every response encoder
fail on it). Both checks cost two byte counts and one byte search on ordinary bodies; only a
body that could hold such a value is walked.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.requests import Request

from .. import errors


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


MAX_JSON_DEPTH = 32
#: the escape of a UTF-16 surrogate (paired ones decode to one character; lone ones survive)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(literal: str) -> float:
    value = float(literal)
    if value in (math.inf, -math.inf):  # 1e400: JSON has no infinity, so the number is out of range
        raise ValueError(f"{literal[:20]} is out of range")
    return value


def _invalid_json() -> errors.InvalidRequest:
    return errors.InvalidRequest("We could not parse the JSON body of your request. The body must be valid JSON.",
                                 code="invalid_json")


def _too_deep() -> errors.InvalidRequest:
    return errors.InvalidRequest(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.",
                                 code="invalid_json")


def _param(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out[:200]


def _check_tree(value: Any, strings: bool) -> None:
    """Walk ``value`` (iteratively: the walk itself must not recurse) for nesting deeper than
    MAX_JSON_DEPTH and, when ``strings``, for a string or key holding a lone surrogate."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(node, dict):
            for key, item in node.items():
                if strings and _SURROGATE.search(key):
                    raise errors.InvalidRequest(f"A key in '{_param(path) or 'the body'}' is not valid Unicode "
                                                "(a lone surrogate).", param=_param(path) or None,
                                                code="invalid_unicode")
                stack.append((item, (*path, key)))
        elif isinstance(node, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(node))
        elif strings and isinstance(node, str) and _SURROGATE.search(node):
            raise errors.InvalidRequest(f"Invalid '{_param(path)}': the string is not valid Unicode (a lone "
                                        "surrogate).", param=_param(path) or None, code="invalid_unicode")


def parse_json(body: bytes) -> Any:
    """``body`` as JSON, refused with a 400 when it is not JSON, nests too deeply or holds a
    string that is not valid Unicode."""
    try:
        value = json.loads(body, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise _invalid_json() from None
    deep = body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH  # a bound on the depth: most bodies stop here
    surrogates = _SURROGATE_ESCAPE.search(body) is not None
    if deep or surrogates:
        _check_tree(value, surrogates)
    return value


async def read_json(request: Request, limit: int) -> Any:
    return parse_json(await read_body(request, limit))


async def read_object(request: Request, limit: int) -> dict[str, Any]:
    body = await read_json(request, limit)
    if not isinstance(body, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    return body


def scopes_field(body: dict[str, Any], default: str = "tenant") -> tuple[str, ...]:
    """``scopes`` of a key request (default: ``default`` alone)."""
    scopes = body.get("scopes", [default])
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise errors.InvalidRequest("Invalid 'scopes': expected an array of strings.", param="scopes",
                                    code="invalid_type")
    return tuple(scopes)
