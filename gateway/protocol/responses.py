"""OpenAI response bodies and server-sent events, as plain dicts/bytes (validated against
OpenAI's published schemas in the tests)."""
from __future__ import annotations

import json
import urllib.parse
from typing import Any

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

DONE = b"data: [DONE]\n\n"
#: printable ASCII that may stand in a header value as it is ("%" is left out, so decoding
#: with urllib.parse.unquote always gives the name back)
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7f) if chr(c) not in "%")


def header_text(name: str) -> str:
    """A tenant-chosen name as an HTTP header value (``x-tensafe-expert``): unchanged when it is
    printable ASCII without "%", otherwise its UTF-8 percent-encoded, so no name (non-Latin-1,
    CR, LF, NUL) can break the response or split a header."""
    if name.isascii() and name.isprintable() and "%" not in name:
        return name
    return urllib.parse.quote(name.encode("utf-8", "replace"), safe=_HEADER_SAFE)


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(payload).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}


def chat_completion(rid: str, created: int, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_usage_chunk(rid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion(rid: str, created: int, model: str, text: str, finish_reason: str | None,
               prompt_tokens: int | None = None, completion_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if prompt_tokens is not None and completion_tokens is not None:
        out["usage"] = usage(prompt_tokens, completion_tokens)
    return out


def completion_usage_chunk(rid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
