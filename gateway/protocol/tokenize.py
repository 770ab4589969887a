"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` bodies and answers.

``/tokenize`` takes ``{"model", "prompt", "add_special_tokens" (default true)}`` or
``{"model", "messages", "add_generation_prompt" (default true), "add_special_tokens" (default
false)}``, both with ``"return_token_strs"`` (default false), and answers ``{"count",
"max_model_len", "tokens", "token_strs"}``. ``/detokenize`` takes ``{"model", "tokens"}`` and
answers ``{"prompt"}``. Other fields are ignored (and reported for logging); a chat template of
the caller's own or a continued final message is refused by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import InvalidRequest
from .requests import ChatMessage, _bool, _wrong, parse_messages, parse_model

MAX_TOKENS_IN = 1 << 20  # ids one /detokenize may carry
_TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                    "return_token_strs", "continue_final_message", "chat_template", "chat_template_kwargs", "tools"}


@dataclasses.dataclass(frozen=True, slots=True)
class TokenizeRequest:
    model: str
    prompt: str | None
    messages: tuple[ChatMessage, ...] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    return_token_strs: bool
    ignored: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class DetokenizeRequest:
    model: str
    tokens: tuple[int, ...]


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    return body


def _flag(body: dict, name: str, default: bool) -> bool:
    return _bool(body, name) if body.get(name) is not None else default


def parse_tokenize(body: Any) -> TokenizeRequest:
    body = _object(body)
    model = parse_model(body)
    for name in ("chat_template", "tools"):
        if body.get(name) is not None:
            raise InvalidRequest(f"The parameter '{name}' is not supported by this server.", param=name,
                                 code="unsupported_parameter")
    if _bool(body, "continue_final_message"):
        raise InvalidRequest("The parameter 'continue_final_message' is not supported by this server.",
                             param="continue_final_message", code="unsupported_parameter")
    ignored = tuple(sorted(k for k in body if k not in _TOKENIZE_FIELDS))
    strings = _bool(body, "return_token_strs")
    if body.get("messages") is not None:
        if body.get("prompt") is not None:
            raise InvalidRequest("Send either 'prompt' or 'messages', not both.", param="prompt",
                                 code="invalid_value")
        return TokenizeRequest(model, None, parse_messages(body["messages"]), _flag(body, "add_special_tokens", False),
                               _flag(body, "add_generation_prompt", True), strings, ignored)
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt' (or 'messages').", param="prompt",
                             code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise _wrong("prompt", "a string", prompt)
    return TokenizeRequest(model, prompt, None, _flag(body, "add_special_tokens", True), True, strings, ignored)


def parse_detokenize(body: Any) -> DetokenizeRequest:
    body = _object(body)
    model = parse_model(body)
    tokens = body.get("tokens")
    if tokens is None:
        raise InvalidRequest("Missing required parameter: 'tokens'.", param="tokens", code="missing_required_parameter")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise _wrong("tokens", "an array of integers", tokens)
    if len(tokens) > MAX_TOKENS_IN:
        raise InvalidRequest(f"Invalid 'tokens': at most {MAX_TOKENS_IN} ids.", param="tokens", code="invalid_value")
    if any(not 0 <= t < 2**31 for t in tokens):
        raise InvalidRequest("Invalid 'tokens': token ids must be non-negative 32-bit integers.", param="tokens",
                             code="invalid_value")
    return DetokenizeRequest(model, tuple(tokens))


def tokenize_answer(tokens: list[int], strings: list[str] | None, max_model_len: int) -> dict[str, Any]:
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": strings}
