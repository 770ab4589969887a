"""The package manifest: what the adapter is, whose it is, and how to check the payload.

Encoded as canonical JSON (SPEC.md §4): keys sorted, no whitespace, ASCII only (``\\uXXXX``
escapes), no NaN/Infinity, no duplicate keys. A parser accepts a manifest only if re-encoding
it yields the same bytes, so one manifest has exactly one encoding.

Every field is validated on construction, so a ``Manifest`` object is always well formed;
problems raise ``InvalidAdapter`` naming the field (``open_package`` turns that into the
opaque ``InvalidPackage``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from .errors import InvalidAdapter
from .lora import LoraConfig

MANIFEST_FORMAT_VERSION = 1
PAYLOAD_DTYPES = ("BF16", "F16", "F32")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,255}")
_MODULE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.]{1,256}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_identifier(value: Any, field: str, pattern: re.Pattern[str] = _ID) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidAdapter(
            f"{field} {value!r} is invalid: it must match {pattern.pattern}")
    return value


def check_labels(tenant: Any, name: Any, version: Any, base_model: Any) -> None:
    """Check the caller-chosen labels of a package (raises ``InvalidAdapter``)."""
    check_identifier(tenant, "tenant")
    check_identifier(name, "adapter name")
    check_identifier(version, "adapter version", _VERSION)
    check_identifier(base_model, "base model id", _MODEL_ID)


def _check_int(value: Any, field: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidAdapter(f"{field} must be an integer >= {minimum}, got {value!r}")
    return value


def _reject_constant(name: str) -> Any:
    raise InvalidAdapter(f"manifest JSON contains {name}")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


class TensorSpec(NamedTuple):
    """One payload tensor as the manifest lists it (a tuple: cheap to build by the hundred)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _check_tensor_specs(tensors: Any) -> None:
    if not isinstance(tensors, tuple) or not tensors:
        raise InvalidAdapter("tensors must be a non-empty list")
    previous = ""
    for spec in tensors:
        if type(spec) is not TensorSpec:
            raise InvalidAdapter(f"tensor entry {spec!r} is not a TensorSpec")
        name, shape, dtype = spec
        if type(name) is not str or not _TENSOR_NAME.fullmatch(name):
            raise InvalidAdapter(f"tensor name {name!r} is invalid")
        if name <= previous:
            raise InvalidAdapter(
                f"tensors must be sorted by unique name ({name!r} after {previous!r})")
        previous = name
        if (type(shape) is not tuple or not shape
                or not all(type(d) is int and d > 0 for d in shape)):
            raise InvalidAdapter(f"tensor {name}: shape {shape!r} must be positive integers")
        if dtype not in PAYLOAD_DTYPES:
            raise InvalidAdapter(f"tensor {name}: dtype {dtype!r} not in {PAYLOAD_DTYPES}")


@dataclass(frozen=True)
class Manifest:
    """Signed description of one adapter package (see SPEC.md §4 for each field)."""

    tenant: str
    name: str
    version: str
    base_model: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    tensors: tuple[TensorSpec, ...]
    payload_length: int
    payload_sha256: str
    created: int
    signer_key_id: str
    recipient_key_id: str
    format_version: int = MANIFEST_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != MANIFEST_FORMAT_VERSION or isinstance(self.format_version, bool):
            raise InvalidAdapter(f"manifest format_version {self.format_version!r} is not "
                                 f"{MANIFEST_FORMAT_VERSION}")
        check_labels(self.tenant, self.name, self.version, self.base_model)
        _check_int(self.rank, "rank", 1)
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise InvalidAdapter(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.use_rslora, bool):
            raise InvalidAdapter(f"use_rslora must be true or false, got {self.use_rslora!r}")
        modules = self.target_modules
        if (not isinstance(modules, tuple) or not modules or list(modules) != sorted(set(modules))
                or not all(isinstance(m, str) and _MODULE.fullmatch(m) for m in modules)):
            raise InvalidAdapter(f"target_modules {modules!r} must be sorted, unique module names")
        _check_tensor_specs(self.tensors)
        _check_int(self.payload_length, "payload_length", 1)
        _check_int(self.created, "created", 0)
        for field, value in (("payload_sha256", self.payload_sha256),
                             ("signer_key_id", self.signer_key_id),
                             ("recipient_key_id", self.recipient_key_id)):
            if not isinstance(value, str) or not _HEX64.fullmatch(value):
                raise InvalidAdapter(f"{field} must be 64 lowercase hex digits, got {value!r}")

    def lora(self) -> LoraConfig:
        """The adapter's LoRA shape."""
        return LoraConfig(self.rank, float(self.alpha), tuple(self.target_modules), self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["target_modules"] = list(self.target_modules)
        out["tensors"] = [{"name": name, "shape": list(shape), "dtype": dtype}
                          for name, shape, dtype in self.tensors]
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise InvalidAdapter("manifest must be a JSON object")
        expected = {f.name for f in fields(cls)}
        if set(data) != expected:
            missing, extra = sorted(expected - set(data)), sorted(set(data) - expected)
            raise InvalidAdapter(f"manifest fields differ: missing {missing}, unexpected {extra}")
        raw_tensors, raw_modules = data["tensors"], data["target_modules"]
        if not isinstance(raw_tensors, list) or not isinstance(raw_modules, list):
            raise InvalidAdapter("manifest tensors and target_modules must be lists")
        tensors = []
        for entry in raw_tensors:
            if type(entry) is not dict or len(entry) != 3 or "name" not in entry:
                raise InvalidAdapter("each manifest tensor must be {name, shape, dtype}")
            shape = entry.get("shape")
            if type(shape) is not list:
                raise InvalidAdapter(f"tensor {entry['name']!r}: shape must be a list")
            tensors.append(TensorSpec(entry["name"], tuple(shape), entry.get("dtype")))
        return cls(**{**data, "tensors": tuple(tensors), "target_modules": tuple(raw_modules)})

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview) -> Manifest:
        """Strict parse: canonical JSON only (re-encoding must reproduce ``raw``)."""
        raw = bytes(raw)
        # Duplicate keys need no hook: the canonical re-encoding below would differ.
        try:
            data = json.loads(raw.decode("ascii"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InvalidAdapter(f"manifest is not ASCII JSON ({type(exc).__name__})") from None
        manifest = cls.from_dict(data)
        if canonical_json(data) != raw:
            raise InvalidAdapter("manifest JSON is not in canonical form")
        return manifest
