"""OpenAI request bodies, validated by hand into small frozen objects.

Hand-written rather than generated so that every rejection names its parameter the way OpenAI
does (``messages[2].role``), parameters we do not implement are refused by name instead of
being dropped, and fields OpenAI does not define are ignored (and reported to the caller for
logging), except vLLM's sampling extensions that backends honour (``VLLM_SAMPLING``). No torch,
no backend imports.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import InvalidRequest

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4
MAX_STOP_TOKEN_IDS = 64
#: vLLM's sampling parameters beyond OpenAI's that are read (and honoured, or refused by name)
VLLM_SAMPLING = frozenset({"ignore_eos", "min_tokens", "top_k", "repetition_penalty", "stop_token_ids"})


@dataclasses.dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


@dataclasses.dataclass(frozen=True, slots=True)
class Common:
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    user: str | None
    ignored: tuple[str, ...]  # fields OpenAI does not define (logged, not used)
    ignore_eos: bool = False
    min_tokens: int = 0
    top_k: int = 0  # 0: off (vLLM's -1 too)
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest(Common):
    messages: tuple[ChatMessage, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class CompletionRequest(Common):
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _wrong(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)}.",
                          param=param, code="invalid_type")


def _int(body: Mapping, name: str, *, low: int = INT64_MIN, high: int = INT64_MAX) -> int | None:
    """An integer parameter within [low, high]: OpenAI's integers are signed 64-bit."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(name, "an integer", value)
    if value < low:
        raise InvalidRequest(f"Invalid '{name}': {_shown(value)} is below the minimum of {low}.", param=name,
                             code="invalid_value")
    if value > high:
        raise InvalidRequest(f"Invalid '{name}': {_shown(value)} is above the maximum of {high}.", param=name,
                             code="invalid_value")
    return value


def _shown(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"


def _number(body: Mapping, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong(name, "a number", value)
    if isinstance(value, int) and not -1e300 < value < 1e300:  # beyond a float: out of range, not an overflow
        raise InvalidRequest(f"Invalid '{name}': {_shown(value)} must be at most {high}.", param=name,
                             code="invalid_value")
    if not math.isfinite(value):
        raise _wrong(name, "a number", value)
    if value > high or value < low or (low_open and value == low):
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise InvalidRequest(f"Invalid '{name}': {value} must be {bound} and at most {high}.", param=name,
                             code="invalid_value")
    return float(value)


def _bool(body: Mapping, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _wrong(name, "a boolean", value)
    return value


def _unsupported(name: str, why: str = "is not supported by this server") -> InvalidRequest:
    return InvalidRequest(f"The parameter '{name}' {why}.", param=name, code="unsupported_parameter")


# OpenAI parameters we accept only at their neutral value: name -> "is this value neutral?"
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v is None or (v == 1 and not isinstance(v, bool)),
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None or (v == 0 and not isinstance(v, bool)),
    "presence_penalty": lambda v: v is None or (v == 0 and not isinstance(v, bool)),
    "frequency_penalty": lambda v: v is None or (v == 0 and not isinstance(v, bool)),
    "logit_bias": lambda v: v is None or v == {},
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": lambda v: v is None or v == [],
    "functions": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "function_call": lambda v: v is None or v == "none",
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "reasoning_effort": lambda v: v is None,
    "verbosity": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "store": lambda v: v is None or v is False,
    "best_of": lambda v: v is None or (v == 1 and not isinstance(v, bool)),
    "echo": lambda v: v is None or v is False,
    "suffix": lambda v: v is None or v == "",
}
# OpenAI parameters that change nothing about the result here: accepted and not used.
_HINTS = {"metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier",
          "prompt_cache_retention"}

_CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                "temperature", "top_p", "seed", "stop", "user", "n", "logprobs", "top_logprobs", "presence_penalty",
                "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice", "functions",
                "function_call", "audio", "prediction", "modalities", "reasoning_effort", "verbosity",
                "web_search_options", "store"} | _HINTS | VLLM_SAMPLING
_COMPLETION_FIELDS = {"model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed",
                      "stop", "user", "n", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
                      "best_of", "echo", "suffix"} | _HINTS | VLLM_SAMPLING
_CHAT_NEUTRAL = frozenset(_CHAT_FIELDS & _NEUTRAL.keys())
_COMPLETION_NEUTRAL = frozenset(_COMPLETION_FIELDS & _NEUTRAL.keys())


def parse_model(body: Mapping) -> str:
    """The body's required ``model``."""
    model = body.get("model")
    if model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise _wrong("model", "a string", model)
    if not model:
        raise InvalidRequest("Invalid 'model': empty string.", param="model", code="invalid_value")
    return model


def _common(body: Any, known: set[str], neutral: frozenset[str],
            max_tokens_names: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    for name in body:  # an absent parameter is neutral: look only at those sent
        if name in neutral and not _NEUTRAL[name](body[name]):
            raise _unsupported(name, "is not supported by this server with that value")
    model = parse_model(body)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _wrong("stream_options", "an object", options)
        if not stream:
            raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                 param="stream_options", code="invalid_value")
        include_usage = _bool(options, "include_usage")
        if "include_usage" in options and not isinstance(options["include_usage"], bool | None):
            raise _wrong("stream_options.include_usage", "a boolean", options["include_usage"])
    max_tokens = None
    for name in max_tokens_names:
        value = _int(body, name, low=1)
        if value is not None:
            max_tokens = value
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise InvalidRequest(f"Invalid 'stop': at most {MAX_STOP} sequences, got {len(stop)}.", param="stop",
                                 code="invalid_value")
        stops = tuple(s for s in stop if s)
    else:
        raise _wrong("stop", "a string or an array of strings", stop)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _wrong("user", "a string", user)
    seed = _int(body, "seed")
    return dict(
        model=model, stream=stream, include_usage=include_usage, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0,
                                                                               low_open=True),
        seed=seed, stop=stops, user=user, ignored=tuple(sorted(k for k in body if k not in known)),
        **_vllm_sampling(body, max_tokens),
    )


def _vllm_sampling(body: Mapping, max_tokens: int | None) -> dict[str, Any]:
    """vLLM's extensions, with vLLM's ranges (``top_k`` -1 or 0 is off)."""
    min_tokens = _int(body, "min_tokens", low=0) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise InvalidRequest(f"Invalid 'min_tokens': {min_tokens} must be at most max_tokens ({max_tokens}).",
                             param="min_tokens", code="invalid_value")
    top_k = _int(body, "top_k", low=-1) or 0
    ids = body.get("stop_token_ids")
    if ids is None:
        stop_token_ids: tuple[int, ...] = ()
    elif isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"Invalid 'stop_token_ids': at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}.",
                                 param="stop_token_ids", code="invalid_value")
        if any(not 0 <= t < 2**31 for t in ids):
            raise InvalidRequest("Invalid 'stop_token_ids': token ids must be non-negative 32-bit integers.",
                                 param="stop_token_ids", code="invalid_value")
        stop_token_ids = tuple(dict.fromkeys(ids))
    else:
        raise _wrong("stop_token_ids", "an array of integers", ids)
    return dict(ignore_eos=_bool(body, "ignore_eos"), min_tokens=min_tokens, top_k=max(top_k, 0),
                repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 100.0, low_open=True),
                stop_token_ids=stop_token_ids)


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict):
                raise _wrong(f"{param}[{j}]", "an object", part)
            kind = part.get("type")
            if kind != "text":
                raise InvalidRequest(f"Invalid '{param}[{j}].type': only 'text' content parts are supported.",
                                     param=f"{param}[{j}].type", code="unsupported_parameter")
            text = part.get("text")
            if not isinstance(text, str):
                raise _wrong(f"{param}[{j}].text", "a string", text)
            parts.append(text)
        return "".join(parts)
    raise _wrong(param, "a string or an array of content parts", value)


def parse_chat(body: Any) -> ChatRequest:
    common = _common(body, _CHAT_FIELDS, _CHAT_NEUTRAL, ("max_tokens", "max_completion_tokens"))
    return ChatRequest(**common, messages=parse_messages(body.get("messages")))


def parse_messages(raw: Any) -> tuple[ChatMessage, ...]:
    """A chat request's ``messages``."""
    if raw is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages",
                             code="missing_required_parameter")
    if not isinstance(raw, list):
        raise _wrong("messages", "an array", raw)
    if not raw:
        raise InvalidRequest("Invalid 'messages': empty array. Expected an array with minimum length 1.",
                             param="messages", code="empty_array")
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise _wrong(f"messages[{i}]", "an object", msg)
        role = msg.get("role")
        if role is None:
            raise InvalidRequest(f"Missing required parameter: 'messages[{i}].role'.", param=f"messages[{i}].role",
                                 code="missing_required_parameter")
        if not isinstance(role, str) or role not in ROLES:
            shown = role if isinstance(role, str) else _type_name(role)
            raise InvalidRequest(
                f"Invalid value for 'messages[{i}].role': '{shown[:40]}'. Supported values are: 'system', "
                "'developer', 'user' and 'assistant'.", param=f"messages[{i}].role", code="invalid_value")
        for unsupported in ("tool_calls", "function_call", "audio"):
            if msg.get(unsupported) is not None:
                raise _unsupported(f"messages[{i}].{unsupported}")
        if "content" not in msg or msg["content"] is None:
            raise InvalidRequest(f"Missing required parameter: 'messages[{i}].content'.",
                                 param=f"messages[{i}].content", code="missing_required_parameter")
        messages.append(ChatMessage(ROLES[role], _content(msg["content"], f"messages[{i}].content")))
    return tuple(messages)


def parse_completion(body: Any) -> CompletionRequest:
    common = _common(body, _COMPLETION_FIELDS, _COMPLETION_NEUTRAL, ("max_tokens",))
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt",
                             code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("Invalid 'prompt': empty string.", param="prompt", code="invalid_value")
        return CompletionRequest(**common, prompt=prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise InvalidRequest("Invalid 'prompt': token ids must be non-negative.", param="prompt",
                                 code="invalid_value")
        return CompletionRequest(**common, prompt_token_ids=tuple(prompt))
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise _unsupported("prompt", "with more than one prompt is not supported by this server; send one request "
                           "per prompt")
    raise _wrong("prompt", "a string, an array of one string or an array of token ids", prompt)
