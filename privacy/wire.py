"""One framing for ciphertext bundles, on the wire to the key holder and in encrypted adapter
files: ``b"TSHE"``, a little-endian u32 header length, a JSON header object (its ``sizes``: the
byte length of each blob), then the blobs back to back. Nothing in it is pickled; every length
is checked before anything is sliced."""
from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

MAGIC = b"TSHE"
MAX_HEADER_BYTES = 1 << 20


class WireError(ValueError):
    """A bundle that is not well formed."""


def pack(header: dict[str, Any], blobs: Sequence[bytes]) -> bytes:
    if "sizes" in header:
        raise ValueError("'sizes' is the framing's own header key")
    head = json.dumps({**header, "sizes": [len(b) for b in blobs]}, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *blobs])


def unpack(data: bytes, *, max_blobs: int) -> tuple[dict[str, Any], list[bytes]]:
    """The header (without ``sizes``) and the blobs; WireError when anything is off."""
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise WireError("not a TSHE bundle (bad magic)")
    (head_len,) = struct.unpack("<I", view[4:8])
    if head_len > MAX_HEADER_BYTES or 8 + head_len > len(view):
        raise WireError(f"header length {head_len} is out of bounds")
    try:
        header = json.loads(bytes(view[8 : 8 + head_len]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    sizes = header.pop("sizes", None)
    if not isinstance(sizes, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                for s in sizes):
        raise WireError("header 'sizes' must be a list of byte counts")
    if len(sizes) > max_blobs:
        raise WireError(f"{len(sizes)} blobs, more than the {max_blobs} allowed")
    offset = 8 + head_len
    if offset + sum(sizes) != len(view):
        raise WireError(f"blob sizes add up to {sum(sizes)} bytes, the body has {len(view) - offset}")
    blobs = []
    for size in sizes:
        blobs.append(bytes(view[offset : offset + size]))
        offset += size
    return header, blobs
