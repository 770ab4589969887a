"""LoRAX's request body and error shapes, as its router reads and writes them (predibase/lorax
a7394ba: router/src/lib.rs GenerateRequest and ErrorResponse, router/src/server.rs and axum 0.7's
``Json`` extractor rejections, serde's messages), for ``fake_lorax``."""
from __future__ import annotations

import json
from typing import Any

MAX_BODY = 2 * 1024 * 1024  # axum's DefaultBodyLimit
#: GenerateParameters fields checked as serde would: name -> (Rust type, Option<...>)
FIELDS: dict[str, tuple[str, bool]] = {
    "adapter_id": ("string", True), "adapter_source": ("string", True), "api_token": ("string", True),
    "best_of": ("usize", True), "temperature": ("f32", True), "repetition_penalty": ("f32", True),
    "frequency_penalty": ("f32", True), "presence_penalty": ("f32", True), "top_k": ("i32", True),
    "top_p": ("f32", True), "typical_p": ("f32", True), "do_sample": ("bool", False),
    "max_new_tokens": ("u32", True), "ignore_eos_token": ("bool", False), "return_full_text": ("bool", True),
    "stop": ("strings", False), "truncate": ("usize", True), "watermark": ("bool", False),
    "details": ("bool", False), "decoder_input_details": ("bool", False), "return_k_alternatives": ("i32", True),
    "apply_chat_template": ("bool", False), "seed": ("u64", True),
}
EXPECTED = {"string": "a string", "bool": "a boolean", "strings": "a sequence"}
INT_RANGES = {"u32": (0, 2**32 - 1), "i32": (-(2**31), 2**31 - 1), "usize": (0, 2**64 - 1), "u64": (0, 2**64 - 1)}


class Fail(Exception):
    """An InferError: its HTTP status and ErrorResponse body."""

    def __init__(self, status: int, error: str, error_type: str) -> None:
        super().__init__(error)
        self.status, self.error, self.error_type = status, error, error_type

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_type": self.error_type}


def invalid(message: str) -> Fail:
    return Fail(422, f"Input validation error: {message}", "validation")


def generation_error(message: str) -> Fail:
    return Fail(424, f"Request failed during generation: Server error: {message}", "generation")


class Rejected(Exception):
    """An axum extractor rejection: plain text, before the handler."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


def _serde_value(v: Any) -> str:
    if isinstance(v, bool):
        return f"boolean `{str(v).lower()}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f"string {json.dumps(v)}"
    return {list: "sequence", dict: "map"}.get(type(v), "null")


def _serde_error(value: Any, kind: str, nullable: bool) -> str | None:
    """serde's complaint about ``value`` as Rust type ``kind``, or None if it deserializes."""
    expected = EXPECTED.get(kind, kind)
    if value is None:
        return None if nullable else f"invalid type: null, expected {expected}"
    if kind == "strings":
        if not isinstance(value, list):
            return f"invalid type: {_serde_value(value)}, expected a sequence"
        bad = [v for v in value if not isinstance(v, str)]
        return f"invalid type: {_serde_value(bad[0])}, expected a string" if bad else None
    ok = {"string": isinstance(value, str), "bool": isinstance(value, bool),
          "f32": isinstance(value, (int, float)) and not isinstance(value, bool)}.get(kind)
    if ok is None:  # an integer type
        if not isinstance(value, int) or isinstance(value, bool):
            return f"invalid type: {_serde_value(value)}, expected {kind}"
        lo, hi = INT_RANGES[kind]
        return None if lo <= value <= hi else f"invalid value: integer `{value}`, expected {kind}"
    return None if ok else f"invalid type: {_serde_value(value)}, expected {expected}"


def parse_body(content_type: str, raw: bytes) -> dict[str, Any]:
    """The request body as axum's ``Json<GenerateRequest>`` accepts it, else ``Rejected``."""
    mime = content_type.split(";")[0].strip().lower()
    if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
        raise Rejected(415, "Expected request with `Content-Type: application/json`")
    if len(raw) > MAX_BODY:
        raise Rejected(413, "Failed to buffer the request body: length limit exceeded")

    def no_constants(name: str) -> Any:
        raise ValueError(f"invalid number {name}")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise Rejected(400, f"Failed to parse the request body as JSON: {exc}") from None
    prefix = "Failed to deserialize the JSON body into the target type: "
    if not isinstance(body, dict):
        raise Rejected(422, f"{prefix}invalid type: {_serde_value(body)}, expected struct GenerateRequest")
    if "inputs" not in body:
        raise Rejected(422, f"{prefix}missing field `inputs`")
    if (error := _serde_error(body["inputs"], "string", False)) is not None:
        raise Rejected(422, f"{prefix}inputs: {error}")
    params = body.setdefault("parameters", {})
    if not isinstance(params, dict):
        raise Rejected(422, f"{prefix}parameters: invalid type: {_serde_value(params)}, "
                            "expected struct GenerateParameters")
    for name, (kind, nullable) in FIELDS.items():
        if name in params and (error := _serde_error(params[name], kind, nullable)) is not None:
            raise Rejected(422, f"{prefix}parameters.{name}: {error}")
    return body
