"""The plaintext payload: a safetensors file, read without copying.

``encode`` uses the reference ``safetensors`` writer, so a decrypted payload is an ordinary
safetensors file any tool can read. ``decode`` is a strict reader of that format that returns
tensors as views into the one decrypted buffer: ``safetensors.torch.load`` copies every tensor
twice (into a ``bytes`` per tensor, then wraps each), which costs more than the decryption for
a 400-tensor adapter. Beyond the safetensors rules (bounded header, no duplicate names, data
offsets that tile the data region exactly) we require element-aligned offsets, as the reference
writer produces, so every view is aligned, and exactly the tensors the signed manifest lists.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from .errors import InvalidPackage
from .limits import Limits
from .manifest import TensorSpec
from .validate import DTYPE_NAMES, ITEMSIZE

DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
_U64 = struct.Struct("<Q")


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise tensors with the reference writer. Only tensors that share storage with an
    earlier one (e.g. views of an opened package) or are not contiguous are copied, and with
    numpy rather than torch: torch's parallel copy stalls badly on a busy 2-core machine."""
    owned: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages or not tensor.is_contiguous():
            tensor = _numpy_copy(tensor)
        storages.add(storage)
        owned[name] = tensor
    return save_safetensors(owned, metadata={"format": "pt"})


def _numpy_copy(tensor: torch.Tensor) -> torch.Tensor:
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    copied = torch.from_numpy(tensor.view(as_int).numpy().copy(order="C"))
    return copied.view(tensor.dtype)


def describe(tensors: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    """Manifest entries for ``tensors``, sorted by name."""
    return tuple(TensorSpec(name, tuple(tensors[name].shape), DTYPE_NAMES[tensors[name].dtype])
                 for name in sorted(tensors))


def allocate(length: int) -> torch.Tensor:
    """An uninitialised byte buffer (no 10 MB memset, unlike ``bytearray(n)``)."""
    return torch.empty(length, dtype=torch.uint8)


def _entries(header: Any, data_length: int, expected: Mapping[str, TensorSpec]
             ) -> list[tuple[int, int, str, str, tuple[int, ...]]]:
    """Offsets of each tensor; the names, shapes and dtypes must be exactly ``expected``."""
    if not isinstance(header, dict):
        raise InvalidPackage("payload", "payload header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidPackage("payload", "payload __metadata__ must map strings to strings")
    if len(header) != len(expected):
        raise InvalidPackage(
            "payload", f"payload holds {len(header)} tensors, the manifest {len(expected)}")
    entries = []
    for name, info in header.items():
        spec = expected.get(name)
        if spec is None or type(info) is not dict or len(info) != 3:
            raise InvalidPackage("payload", f"payload entry {name!r} is unexpected or malformed")
        shape, dtype, offsets = info.get("shape"), info.get("dtype"), info.get("data_offsets")
        if dtype != spec.dtype or type(shape) is not list or tuple(shape) != spec.shape:
            raise InvalidPackage("payload", f"payload tensor {name!r} differs from the manifest")
        if type(offsets) is not list or len(offsets) != 2:
            raise InvalidPackage("payload", f"payload tensor {name!r} has bad data_offsets")
        begin, end = offsets
        itemsize = ITEMSIZE[dtype]
        if (type(begin) is not int or type(end) is not int or begin % itemsize
                or end - begin != math.prod(shape) * itemsize):
            raise InvalidPackage(
                "payload", f"payload tensor {name!r}: offsets do not match shape/alignment")
        entries.append((begin, end, name, dtype, spec.shape))
    entries.sort()
    cursor = 0
    for begin, end, name, _, _ in entries:
        if begin != cursor:
            raise InvalidPackage(
                "payload", f"payload tensor {name!r} does not follow its predecessor")
        cursor = end
    if cursor != data_length:
        raise InvalidPackage(
            "payload", f"payload data region is {data_length} bytes, tensors cover {cursor}")
    return entries


def decode(buffer: torch.Tensor, expected: Mapping[str, TensorSpec],
           limits: Limits) -> dict[str, torch.Tensor]:
    """Views into ``buffer`` (a 1-D uint8 tensor holding a safetensors file) of exactly the
    tensors ``expected`` lists. Duplicate names need no check: a repeated key would leave the
    bytes of its first occurrence uncovered, which the tiling check rejects."""
    raw = buffer.numpy()
    if len(raw) < _U64.size:
        raise InvalidPackage("payload", "payload shorter than a safetensors header")
    (header_length,) = _U64.unpack_from(raw, 0)
    start = _U64.size + header_length
    if header_length > min(len(raw) - _U64.size, 4 * limits.max_manifest_bytes):
        raise InvalidPackage("payload", f"payload header length {header_length} out of bounds")
    if start % 8:
        raise InvalidPackage("payload", "payload data region is not 8-byte aligned")
    try:
        header = json.loads(raw[_U64.size:start].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidPackage("payload", "payload header is not JSON") from None
    entries = _entries(header, len(raw) - start, expected)
    tensors: dict[str, torch.Tensor] = {}
    strides: dict[tuple[int, ...], tuple[int, ...]] = {}
    i = 0
    while i < len(entries):  # one typed view per run of equal dtype (the writer groups them)
        j = i
        while j < len(entries) and entries[j][3] == entries[i][3]:
            j += 1
        first_begin, itemsize = entries[i][0], ITEMSIZE[entries[i][3]]
        flat = buffer[start + first_begin:start + entries[j - 1][1]].view(DTYPES[entries[i][3]])
        origin = flat.storage_offset()
        for begin, _, name, _, shape in entries[i:j]:
            # as_strided costs half of split + view; bounds were proven by the tiling check
            if shape not in strides:
                strides[shape] = _contiguous_strides(shape)
            tensors[name] = flat.as_strided(shape, strides[shape],
                                            origin + (begin - first_begin) // itemsize)
        i = j
    return tensors


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))
