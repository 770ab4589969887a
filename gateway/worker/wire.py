"""The worker protocol's JSON shapes (see the package docstring), in one place for both ends:
the worker (``worker.app``) and its client (``backends.remote``). A leaf: it knows the Backend
types and errors, nothing of HTTP frameworks or the engine.

Decoding is strict: anything that is not the documented shape is a BadRequest naming the
field, so a bad body is a 400 at the worker and never reaches the engine.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from adapters.lora import LoraConfig

from ..backends.base import BackendChunk, BackendRequest, Capacity, Message, Sampling, Tokens
from ..backends.errors import (
    AdapterProblem,
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
    BadRequest,
    ContextTooLong,
    Unsupported,
)

CAPACITY_HEADER = "x-tensafe-capacity"
LORA_HEADER = "x-tensafe-lora"
NDJSON = "application/x-ndjson"

#: error kind on the wire <-> the exception it stands for, and the status of a refusal of it
KINDS: dict[str, tuple[type[BackendError], int]] = {
    "overloaded": (BackendOverloaded, 503),
    "unavailable": (BackendUnavailable, 503),
    "bad_request": (BadRequest, 400),
    "context_too_long": (ContextTooLong, 400),
    "adapter": (AdapterProblem, 409),
    "unsupported": (Unsupported, 501),
}
_KIND_OF = {cls: kind for kind, (cls, _) in KINDS.items()}
#: adapter problems whose status is not the kind's
ADAPTER_STATUS = {"not_found": 404}
#: attribute an error carries -> its field on the wire (AdapterProblem.kind is the "reason") and
#: the value it takes when a body leaves the field out
_FIELDS = {"param": ("param", None), "adapter_id": ("adapter_id", ""), "kind": ("reason", "invalid")}
_ROLES = frozenset({"system", "user", "assistant"})
_FINISH = frozenset({"stop", "length", "abort"})

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


@functools.cache
def _extras(cls: type[BackendError]) -> tuple[str, ...]:
    """The attributes ``cls`` takes besides its message, by its constructor's parameter names
    (so a new error class with such attributes travels without a change here)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in params if p.name in _FIELDS)


def kind_of(exc: BackendError) -> str:
    return next(_KIND_OF[cls] for cls in type(exc).__mro__ if cls in _KIND_OF)


def error_body(exc: BackendError) -> dict[str, Any]:
    fields: dict[str, Any] = {"kind": kind_of(exc), "message": str(exc), "param": None, "adapter_id": None,
                              "reason": None}
    for name in _extras(type(exc)):
        fields[_FIELDS[name][0]] = getattr(exc, name, None)
    return {"error": fields}


def error_status(exc: BackendError) -> int:
    if isinstance(exc, AdapterProblem) and exc.kind in ADAPTER_STATUS:
        return ADAPTER_STATUS[exc.kind]
    return KINDS[kind_of(exc)][1]


def error_from(body: Any, status: int) -> BackendError:
    """The exception an error body stands for. Anything else (a proxy's page, an unknown kind,
    the 401 of a wrong token) means this worker cannot serve us: BackendUnavailable."""
    fields = body.get("error") if isinstance(body, dict) else None
    entry = KINDS.get(fields.get("kind")) if isinstance(fields, dict) else None
    if entry is None:
        message = fields.get("message") if isinstance(fields, dict) else None
        return BackendUnavailable(f"worker answered {status}: {message or 'no error body'}")
    cls = entry[0]
    extras = {}
    for name in _extras(cls):
        field, missing = _FIELDS[name]
        value = fields.get(field)
        extras[name] = value if isinstance(value, str) else missing
    return cls(str(fields.get("message") or ""), **extras)


# ---- requests ---------------------------------------------------------------------------------
def request_body(request: BackendRequest) -> bytes:
    s = request.sampling
    body: dict[str, Any] = {
        "request_id": request.request_id, "adapter_id": request.adapter_id, "cache_salt": request.cache_salt,
        "sampling": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                     "stop": list(s.stop), "ignore_eos": s.ignore_eos, "min_tokens": s.min_tokens,
                     "top_k": s.top_k, "repetition_penalty": s.repetition_penalty,
                     "stop_token_ids": list(s.stop_token_ids)},
    }
    if request.messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    if request.prompt is not None:
        body["prompt"] = request.prompt
    if request.prompt_token_ids is not None:
        body["prompt_token_ids"] = list(request.prompt_token_ids)
    return _dumps(body).encode()


def _field(obj: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], *, optional: bool = False,
           default: Any = None) -> Any:
    value = obj.get(name, default)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"{name} must be {_names(kinds)}", param=name)
    if not isinstance(value, kinds):
        raise BadRequest(f"{name} must be {_names(kinds)}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{name} must be finite", param=name)
    if isinstance(value, int) and not -(1 << 63) <= value < 1 << 63:
        raise BadRequest(f"{name} must fit in a signed 64-bit integer", param=name)
    return value


def _names(kinds: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{name} must be a list of strings", param=name)
    return tuple(value)


def _ints(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadRequest(f"{name} must be a list of integers", param=name)
    return tuple(value)


def _messages(items: Any) -> tuple[Message, ...]:
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise BadRequest("messages must be a list of objects", param="messages")
    for m in items:
        if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise BadRequest("each message needs a role (system, user, assistant) and a string content",
                             param="messages")
    return tuple(Message(m["role"], m["content"]) for m in items)


def request_from(body: Any) -> BackendRequest:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    raw = body.get("sampling", {})
    if not isinstance(raw, dict):
        raise BadRequest("sampling must be an object", param="sampling")
    sampling = Sampling(
        max_tokens=_field(raw, "max_tokens", int, optional=True),
        temperature=float(_field(raw, "temperature", (int, float), default=1.0)),
        top_p=float(_field(raw, "top_p", (int, float), default=1.0)),
        seed=_field(raw, "seed", int, optional=True),
        stop=_strings(raw.get("stop", []), "stop"),
        ignore_eos=_field(raw, "ignore_eos", bool, default=False),
        min_tokens=_field(raw, "min_tokens", int, default=0),
        top_k=_field(raw, "top_k", int, default=0),
        repetition_penalty=float(_field(raw, "repetition_penalty", (int, float), default=1.0)),
        stop_token_ids=_ints(raw.get("stop_token_ids", []), "stop_token_ids"),
    )
    messages = prompt = token_ids = None
    if body.get("messages") is not None:
        messages = _messages(body["messages"])
    if body.get("prompt") is not None:
        prompt = _field(body, "prompt", str)
    if body.get("prompt_token_ids") is not None:
        ids = body["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise BadRequest("prompt_token_ids must be a list of integers", param="prompt_token_ids")
        token_ids = tuple(ids)
    if sum(x is not None for x in (messages, prompt, token_ids)) != 1:
        raise BadRequest("exactly one of messages, prompt and prompt_token_ids is needed", param="messages")
    return BackendRequest(
        request_id=_field(body, "request_id", str), sampling=sampling, messages=messages, prompt=prompt,
        prompt_token_ids=token_ids, adapter_id=_field(body, "adapter_id", str, optional=True),
        cache_salt=_field(body, "cache_salt", str, default=""),
    )


# ---- tokenizing ------------------------------------------------------------------------------
def tokenize_body(prompt: str | None, messages: Sequence[Message] | None, add_special_tokens: bool,
                  add_generation_prompt: bool, with_strings: bool) -> bytes:
    body: dict[str, Any] = {"add_special_tokens": add_special_tokens, "add_generation_prompt": add_generation_prompt,
                            "with_strings": with_strings}
    if messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in messages]
    else:
        body["prompt"] = prompt
    return _dumps(body).encode()


def tokenize_from(body: Any) -> dict[str, Any]:
    """The keyword arguments of ``Backend.tokenize``."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = _messages(body["messages"]) if body.get("messages") is not None else None
    prompt = _field(body, "prompt", str, optional=True)
    if (messages is None) == (prompt is None):
        raise BadRequest("exactly one of prompt and messages is needed", param="prompt")
    return dict(prompt=prompt, messages=messages,
                add_special_tokens=_field(body, "add_special_tokens", bool, default=False),
                add_generation_prompt=_field(body, "add_generation_prompt", bool, default=True),
                with_strings=_field(body, "with_strings", bool, default=False))


def tokens_from(body: Any) -> Tokens:
    ids = body.get("tokens") if isinstance(body, dict) else None
    strings = body.get("token_strs") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise BackendUnavailable("worker sent tokens that are not a list of integers")
    if strings is not None and (not isinstance(strings, list) or not all(isinstance(t, str) for t in strings)):
        raise BackendUnavailable("worker sent token strings that are not a list of strings")
    return Tokens(ids, strings)


def detokenize_from(body: Any) -> list[int]:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return list(_ints(body.get("tokens"), "tokens"))


# ---- chunks -----------------------------------------------------------------------------------
def chunk_line(chunk: BackendChunk) -> bytes:
    return (_dumps({"text": chunk.text, "prompt_tokens": chunk.prompt_tokens,
                    "completion_tokens": chunk.completion_tokens, "finish_reason": chunk.finish_reason})
            + "\n").encode()


def error_line(exc: BackendError) -> bytes:
    return (_dumps(error_body(exc)) + "\n").encode()


def chunk_from(line: Mapping[str, Any]) -> BackendChunk:
    """One decoded line; an error line raises its error."""
    if "error" in line:
        raise error_from(line, 200)
    reason = line.get("finish_reason")
    if reason is not None and reason not in _FINISH:
        raise BackendUnavailable(f"worker sent an unknown finish_reason {reason!r}")
    return BackendChunk(line["text"], line["prompt_tokens"], line["completion_tokens"], reason)


# ---- capacity and adapters --------------------------------------------------------------------
def capacity_fields(capacity: Capacity) -> dict[str, int]:
    return dataclasses.asdict(capacity)


def capacity_from(fields: Mapping[str, Any]) -> Capacity:
    return Capacity(**{f.name: int(fields.get(f.name, 0)) for f in dataclasses.fields(Capacity)})


def stamp(capacity: Capacity, epoch: str, seq: int) -> str:
    return _dumps({**capacity_fields(capacity), "epoch": epoch, "seq": seq})


def lora_header(config: LoraConfig) -> str:
    return json.dumps({"rank": config.rank, "alpha": config.alpha, "target_modules": list(config.target_modules),
                       "use_rslora": config.use_rslora}, separators=(",", ":"))


def lora_from(header: str | None) -> LoraConfig:
    if not header:
        raise BadRequest(f"the {LORA_HEADER} header is missing", param=LORA_HEADER)
    try:
        raw = json.loads(header)
    except ValueError:
        raise BadRequest(f"the {LORA_HEADER} header is not JSON", param=LORA_HEADER) from None
    if not isinstance(raw, dict):
        raise BadRequest(f"the {LORA_HEADER} header must be a JSON object", param=LORA_HEADER)
    return LoraConfig(rank=_field(raw, "rank", int), alpha=float(_field(raw, "alpha", (int, float))),
                      target_modules=_strings(raw.get("target_modules"), "target_modules"),
                      use_rslora=_field(raw, "use_rslora", bool, default=False))


def adapter_ids(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BackendUnavailable("worker sent an adapter list that is not a list of strings")
    return list(value)


def dumps(obj: Any) -> bytes:
    return _dumps(obj).encode()

