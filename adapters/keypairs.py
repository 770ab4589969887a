"""Hybrid key pairs, the classes behind ``adapters.keys``: signing (Ed25519 + ML-DSA-65) and
recipient (X25519 + ML-KEM-768).

Each hybrid key is a pair of classical and post-quantum keys so that a package stays authentic
and confidential unless *both* algorithms are broken. Keys serialise as PEM: PKCS#8 for private
keys, SubjectPublicKeyInfo for public keys, one PEM per algorithm. On disk a key is a directory
of such files (see ``SPEC.md`` §6); private files are created with mode 0600 and never widened.

A key id is the lowercase hex SHA-256 of the component raw public keys concatenated in a fixed
order (classical first): Ed25519 (32 B) || ML-DSA-65 (1952 B) for signing keys, X25519 (32 B)
|| ML-KEM-768 (1184 B) for recipient keys. It identifies the public key, so a private key and
its public half share one id.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519

from .errors import KeyFileError

_PRIVATE_PEM_BLOCK = re.compile(
    rb"-----BEGIN PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]*?-----END PRIVATE KEY-----\r?\n?"
)


def _key_id(*raw_public: bytes) -> str:
    return hashlib.sha256(b"".join(raw_public)).hexdigest()


def _public_pem(key: Any) -> bytes:
    return key.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)


def _private_pem(key: Any) -> bytes:
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())


def _raw(key: Any) -> bytes:
    return key.public_bytes_raw()


def load_public_pem(pem: bytes, expected: type, what: str) -> Any:
    """Parse one SubjectPublicKeyInfo PEM and insist on its algorithm."""
    try:
        key = ser.load_pem_public_key(bytes(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{what} public key PEM cannot be parsed ({exc})") from None
    if not isinstance(key, expected):
        raise KeyFileError(f"expected a {what} public key, found {type(key).__name__}")
    return key


def load_private_pem(pem: bytes, expected: type, what: str) -> Any:
    """Parse one unencrypted PKCS#8 PEM and insist on its algorithm."""
    try:
        key = ser.load_pem_private_key(bytes(pem), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{what} private key PEM cannot be parsed ({exc})") from None
    if not isinstance(key, expected):
        raise KeyFileError(f"expected a {what} private key, found {type(key).__name__}")
    return key


def _split_private_bundle(data: bytes) -> list[bytes]:
    """Split concatenated PKCS#8 PEM blocks (the private-key byte form)."""
    blocks = _PRIVATE_PEM_BLOCK.findall(bytes(data))
    if len(blocks) != 2:
        raise KeyFileError(f"expected 2 PEM private keys, found {len(blocks)}")
    return blocks


class SigningPublicKey:
    """Ed25519 + ML-DSA-65 public key of a tenant; verifies package signatures."""

    __slots__ = ("ed25519", "mldsa65", "key_id")
    ALGORITHMS = ("ed25519", "mldsa65")

    def __init__(self, ed25519_key: ed25519.Ed25519PublicKey, mldsa65_key: mldsa.MLDSA65PublicKey):
        self.ed25519 = ed25519_key
        self.mldsa65 = mldsa65_key
        self.key_id: str = _key_id(_raw(ed25519_key), _raw(mldsa65_key))

    @classmethod
    def from_pems(cls, ed25519_pem: bytes, mldsa_pem: bytes) -> SigningPublicKey:
        return cls(
            load_public_pem(ed25519_pem, ed25519.Ed25519PublicKey, "Ed25519"),
            load_public_pem(mldsa_pem, mldsa.MLDSA65PublicKey, "ML-DSA-65"),
        )

    def to_pems(self) -> dict[str, bytes]:
        """``{"ed25519_pem", "mldsa_pem"}``: the keyword arguments of :meth:`from_pems`."""
        return {"ed25519_pem": _public_pem(self.ed25519), "mldsa_pem": _public_pem(self.mldsa65)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SigningPublicKey) and other.key_id == self.key_id

    def __hash__(self) -> int:
        return hash(("signing", self.key_id))

    def __repr__(self) -> str:
        return f"SigningPublicKey(key_id={self.key_id[:16]}...)"


class SigningPrivateKey:
    """Ed25519 + ML-DSA-65 private key; signs packages."""

    __slots__ = ("ed25519", "mldsa65", "_public")

    def __init__(self, ed25519_key: ed25519.Ed25519PrivateKey,
                 mldsa65_key: mldsa.MLDSA65PrivateKey):
        self.ed25519 = ed25519_key
        self.mldsa65 = mldsa65_key
        self._public = SigningPublicKey(ed25519_key.public_key(), mldsa65_key.public_key())

    @property
    def key_id(self) -> str:
        return self._public.key_id

    def public_key(self) -> SigningPublicKey:
        return self._public

    @classmethod
    def from_pems(cls, ed25519_pem: bytes, mldsa_pem: bytes) -> SigningPrivateKey:
        return cls(
            load_private_pem(ed25519_pem, ed25519.Ed25519PrivateKey, "Ed25519"),
            load_private_pem(mldsa_pem, mldsa.MLDSA65PrivateKey, "ML-DSA-65"),
        )

    def to_pems(self) -> dict[str, bytes]:
        return {"ed25519_pem": _private_pem(self.ed25519), "mldsa_pem": _private_pem(self.mldsa65)}

    def to_bytes(self) -> bytes:
        """Both PKCS#8 PEMs concatenated (Ed25519 first): one blob for a key store."""
        pems = self.to_pems()
        return pems["ed25519_pem"] + pems["mldsa_pem"]

    @classmethod
    def from_bytes(cls, data: bytes) -> SigningPrivateKey:
        first, second = _split_private_bundle(data)
        return cls.from_pems(first, second)

    def __repr__(self) -> str:
        return f"SigningPrivateKey(key_id={self.key_id[:16]}...)"


class RecipientPublicKey:
    """X25519 + ML-KEM-768 public key of the gateway; tenants wrap data keys to it."""

    __slots__ = ("x25519", "mlkem768", "key_id")
    ALGORITHMS = ("x25519", "mlkem768")

    def __init__(self, x25519_key: x25519.X25519PublicKey, mlkem768_key: mlkem.MLKEM768PublicKey):
        self.x25519 = x25519_key
        self.mlkem768 = mlkem768_key
        self.key_id: str = _key_id(_raw(x25519_key), _raw(mlkem768_key))

    @classmethod
    def from_pems(cls, x25519_pem: bytes, mlkem768_pem: bytes) -> RecipientPublicKey:
        return cls(
            load_public_pem(x25519_pem, x25519.X25519PublicKey, "X25519"),
            load_public_pem(mlkem768_pem, mlkem.MLKEM768PublicKey, "ML-KEM-768"),
        )

    def to_pems(self) -> dict[str, bytes]:
        """``{"x25519_pem", "mlkem768_pem"}``: the keyword arguments of :meth:`from_pems`."""
        return {"x25519_pem": _public_pem(self.x25519), "mlkem768_pem": _public_pem(self.mlkem768)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecipientPublicKey) and other.key_id == self.key_id

    def __hash__(self) -> int:
        return hash(("recipient", self.key_id))

    def __repr__(self) -> str:
        return f"RecipientPublicKey(key_id={self.key_id[:16]}...)"


class RecipientPrivateKey:
    """X25519 + ML-KEM-768 private key of the gateway; unwraps data keys."""

    __slots__ = ("x25519", "mlkem768", "_public")

    def __init__(self, x25519_key: x25519.X25519PrivateKey, mlkem768_key: mlkem.MLKEM768PrivateKey):
        self.x25519 = x25519_key
        self.mlkem768 = mlkem768_key
        self._public = RecipientPublicKey(x25519_key.public_key(), mlkem768_key.public_key())

    @property
    def key_id(self) -> str:
        return self._public.key_id

    def public_key(self) -> RecipientPublicKey:
        return self._public

    @classmethod
    def from_pems(cls, x25519_pem: bytes, mlkem768_pem: bytes) -> RecipientPrivateKey:
        return cls(
            load_private_pem(x25519_pem, x25519.X25519PrivateKey, "X25519"),
            load_private_pem(mlkem768_pem, mlkem.MLKEM768PrivateKey, "ML-KEM-768"),
        )

    def to_pems(self) -> dict[str, bytes]:
        return {"x25519_pem": _private_pem(self.x25519),
                "mlkem768_pem": _private_pem(self.mlkem768)}

    def to_bytes(self) -> bytes:
        """Both PKCS#8 PEMs concatenated (X25519 first): one blob for a key store."""
        pems = self.to_pems()
        return pems["x25519_pem"] + pems["mlkem768_pem"]

    @classmethod
    def from_bytes(cls, data: bytes) -> RecipientPrivateKey:
        first, second = _split_private_bundle(data)
        return cls.from_pems(first, second)

    def __repr__(self) -> str:
        return f"RecipientPrivateKey(key_id={self.key_id[:16]}...)"


def generate_signing_key() -> SigningPrivateKey:
    return SigningPrivateKey(ed25519.Ed25519PrivateKey.generate(),
                             mldsa.MLDSA65PrivateKey.generate())


def generate_recipient_key() -> RecipientPrivateKey:
    return RecipientPrivateKey(x25519.X25519PrivateKey.generate(),
                               mlkem.MLKEM768PrivateKey.generate())
