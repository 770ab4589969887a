"""TSSP v1 byte layout: a fixed header, then the sections it sizes, in this order::

    header (96) | manifest | wrapped key | nonce (12) | ciphertext | tag (16)
        | Ed25519 signature | ML-DSA-65 signature

All integers are big-endian. ``parse`` checks every declared length against the limits and
the file size *before* creating any view of a section, and creates only zero-copy
``memoryview`` slices: a hostile header cannot make us allocate or read past the file.
See SPEC.md §3 for the field table.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import InvalidPackage
from .hybrid_kem import WRAPPED_KEY_LENGTH
from .limits import Limits
from .signatures import ED25519_SIGNATURE_LENGTH, MLDSA65_SIGNATURE_LENGTH

MAGIC = b"TSSP"
FORMAT_VERSION = 1
SUITE_HYBRID_V1 = 1  # Ed25519+ML-DSA-65 / X25519+ML-KEM-768+HKDF-SHA256+AES-KW / AES-256-GCM
NONCE_LENGTH = 12
TAG_LENGTH = 16
KEY_ID_LENGTH = 32
_HEADER = struct.Struct(">4sBBH32s32sIIQHHI")
HEADER_LENGTH = _HEADER.size  # 96


@dataclass(frozen=True)
class Header:
    """The fixed header. Key ids are raw 32-byte SHA-256 values (hex in the manifest)."""

    signer_key_id: bytes
    recipient_key_id: bytes
    manifest_length: int
    payload_length: int
    wrapped_key_length: int = WRAPPED_KEY_LENGTH
    version: int = FORMAT_VERSION
    suite: int = SUITE_HYBRID_V1
    flags: int = 0
    ed25519_sig_length: int = ED25519_SIGNATURE_LENGTH
    mldsa65_sig_length: int = MLDSA65_SIGNATURE_LENGTH
    reserved: int = 0

    def encode(self) -> bytes:
        return _HEADER.pack(
            MAGIC, self.version, self.suite, self.flags, self.signer_key_id,
            self.recipient_key_id, self.manifest_length, self.wrapped_key_length,
            self.payload_length, self.ed25519_sig_length, self.mldsa65_sig_length, self.reserved)

    @property
    def total_length(self) -> int:
        return (HEADER_LENGTH + self.manifest_length + self.wrapped_key_length + NONCE_LENGTH
                + self.payload_length + TAG_LENGTH + self.ed25519_sig_length
                + self.mldsa65_sig_length)


@dataclass(frozen=True)
class Sections:
    """Zero-copy views of one package's sections (valid while the package bytes live)."""

    header: Header
    header_and_manifest: memoryview  # the AES-GCM associated data
    manifest: memoryview
    wrapped_key: memoryview
    nonce: memoryview
    ciphertext_and_tag: memoryview  # contiguous, as AES-GCM decrypt wants it
    tag: memoryview
    ed25519_sig: memoryview
    mldsa65_sig: memoryview
    signed_prefix: memoryview  # header || manifest || wrapped key || nonce

    def signed_message(self) -> bytes:
        """header || manifest || wrapped key || nonce || tag: what both signatures cover."""
        return b"".join((self.signed_prefix, self.tag))


def signed_message(header: bytes, manifest: bytes, wrapped_key: bytes, nonce: bytes,
                   tag: bytes) -> bytes:
    return b"".join((header, manifest, wrapped_key, nonce, tag))


def _decode_header(data: memoryview) -> Header:
    if len(data) < HEADER_LENGTH:
        raise InvalidPackage("bounds", f"truncated header ({len(data)} < {HEADER_LENGTH} bytes)")
    (magic, version, suite, flags, signer, recipient, manifest_len, wrapped_len, payload_len,
     ed_len, ml_len, reserved) = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise InvalidPackage("bounds", "bad magic")
    if version != FORMAT_VERSION:
        raise InvalidPackage("bounds", f"unsupported format version {version}")
    if suite != SUITE_HYBRID_V1:
        raise InvalidPackage("bounds", f"unsupported algorithm suite {suite}")
    if flags != 0 or reserved != 0:
        raise InvalidPackage("bounds", "reserved header bits set")
    return Header(signer, recipient, manifest_len, payload_len, wrapped_len, version, suite,
                  flags, ed_len, ml_len, reserved)


def _check_lengths(header: Header, file_length: int, limits: Limits) -> None:
    if header.wrapped_key_length != WRAPPED_KEY_LENGTH:
        raise InvalidPackage(
            "bounds", f"wrapped key length {header.wrapped_key_length} != {WRAPPED_KEY_LENGTH}")
    if (header.ed25519_sig_length, header.mldsa65_sig_length) != (
            ED25519_SIGNATURE_LENGTH, MLDSA65_SIGNATURE_LENGTH):
        raise InvalidPackage("bounds", "signature lengths do not match the suite")
    if not 0 < header.manifest_length <= limits.max_manifest_bytes:
        raise InvalidPackage("bounds", 
            f"manifest length {header.manifest_length} outside 1..{limits.max_manifest_bytes}")
    if not 0 < header.payload_length <= limits.max_payload_bytes:
        raise InvalidPackage("bounds", 
            f"payload length {header.payload_length} outside 1..{limits.max_payload_bytes}")
    if header.total_length != file_length:
        raise InvalidPackage("bounds", 
            f"declared section lengths sum to {header.total_length}, file has {file_length}")


def parse(data: bytes | bytearray | memoryview, limits: Limits) -> Sections:
    """Split a package into sections after checking every length. Raises ``InvalidPackage``."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    header = _decode_header(view)
    _check_lengths(header, len(view), limits)
    m_end = HEADER_LENGTH + header.manifest_length
    w_end = m_end + header.wrapped_key_length
    n_end = w_end + NONCE_LENGTH
    c_end = n_end + header.payload_length
    t_end = c_end + TAG_LENGTH
    e_end = t_end + header.ed25519_sig_length
    return Sections(
        header=header,
        header_and_manifest=view[:m_end],
        manifest=view[HEADER_LENGTH:m_end],
        wrapped_key=view[m_end:w_end],
        nonce=view[w_end:n_end],
        ciphertext_and_tag=view[n_end:t_end],
        tag=view[c_end:t_end],
        ed25519_sig=view[t_end:e_end],
        mldsa65_sig=view[e_end:],
        signed_prefix=view[:n_end],
    )


def assemble(header: Header, manifest: bytes, wrapped_key: bytes, nonce: bytes,
             ciphertext_and_tag: bytes, ed25519_sig: bytes, mldsa65_sig: bytes) -> bytes:
    """Concatenate sections; checks they match the header's declared lengths."""
    parts = (header.encode(), manifest, wrapped_key, nonce, ciphertext_and_tag, ed25519_sig,
             mldsa65_sig)
    out = b"".join(parts)
    if len(out) != header.total_length:
        raise ValueError(f"sections total {len(out)} bytes, header declares {header.total_length}")
    return out
