"""Hybrid key wrapping: the package's data key is wrapped to the gateway's recipient key with
X25519 (ephemeral-static) and ML-KEM-768, so reading it needs breaking both.

Wrapped key layout (1160 bytes)::

    ephemeral X25519 public key (32) || ML-KEM-768 ciphertext (1088) || AES-KW(KEK, data key) (40)

KEK = HKDF-SHA256(ikm = ss_mlkem || ss_x25519, salt = none,
                  info = KEM_CONTEXT || 0x00 || transcript, length = 32)
transcript = recipient X25519 pub || recipient ML-KEM-768 pub || ephemeral X25519 pub || ML-KEM ct

Putting both public keys and both ciphertexts into the KDF binds the KEK to this exact
exchange (as X-Wing does), so neither half can be swapped or replayed under another key.
AES key wrap (RFC 3394) suffices for the final step: the KEK is fresh per package and the wrap
carries its own integrity check.
"""
from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from .errors import InvalidPackage
from .keypairs import RecipientPrivateKey, RecipientPublicKey

KEM_CONTEXT = b"tensafe/tssp/v1/hybrid-kem/x25519+mlkem768"
DATA_KEY_LENGTH = 32
X25519_LENGTH = 32
MLKEM768_CIPHERTEXT_LENGTH = 1088
KEY_WRAP_LENGTH = DATA_KEY_LENGTH + 8
WRAPPED_KEY_LENGTH = X25519_LENGTH + MLKEM768_CIPHERTEXT_LENGTH + KEY_WRAP_LENGTH


def _kek(recipient: RecipientPublicKey, ephemeral_pub: bytes, mlkem_ct: bytes,
         ss_x25519: bytes, ss_mlkem: bytes) -> bytes:
    transcript = (recipient.x25519.public_bytes_raw() + recipient.mlkem768.public_bytes_raw()
                  + ephemeral_pub + mlkem_ct)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=KEM_CONTEXT + b"\x00" + transcript)
    return hkdf.derive(ss_mlkem + ss_x25519)


def wrap_data_key(data_key: bytes, recipient: RecipientPublicKey) -> bytes:
    """Wrap a 32-byte data key to ``recipient``; returns ``WRAPPED_KEY_LENGTH`` bytes."""
    if len(data_key) != DATA_KEY_LENGTH:
        raise ValueError(f"data key must be {DATA_KEY_LENGTH} bytes, got {len(data_key)}")
    ephemeral = x25519.X25519PrivateKey.generate()
    ephemeral_pub = ephemeral.public_key().public_bytes_raw()
    ss_x25519 = ephemeral.exchange(recipient.x25519)
    ss_mlkem, mlkem_ct = recipient.mlkem768.encapsulate()
    kek = _kek(recipient, ephemeral_pub, mlkem_ct, ss_x25519, ss_mlkem)
    return ephemeral_pub + mlkem_ct + aes_key_wrap(kek, data_key)


def unwrap_data_key(wrapped: bytes, recipient: RecipientPrivateKey) -> bytes:
    """Recover the data key; any failure is ``InvalidPackage``."""
    if len(wrapped) != WRAPPED_KEY_LENGTH:
        raise InvalidPackage(
            "unwrap", f"wrapped key is {len(wrapped)} bytes, expected {WRAPPED_KEY_LENGTH}")
    wrapped = bytes(wrapped)
    ephemeral_pub = wrapped[:X25519_LENGTH]
    mlkem_ct = wrapped[X25519_LENGTH:X25519_LENGTH + MLKEM768_CIPHERTEXT_LENGTH]
    sealed = wrapped[X25519_LENGTH + MLKEM768_CIPHERTEXT_LENGTH:]
    try:
        ephemeral = x25519.X25519PublicKey.from_public_bytes(ephemeral_pub)
        ss_x25519 = recipient.x25519.exchange(ephemeral)  # ValueError on a low-order point
        ss_mlkem = recipient.mlkem768.decapsulate(mlkem_ct)
    except ValueError:
        raise InvalidPackage(
            "unwrap", "key agreement failed (bad ephemeral key or KEM ciphertext)") from None
    kek = _kek(recipient.public_key(), ephemeral_pub, mlkem_ct, ss_x25519, ss_mlkem)
    try:
        return aes_key_unwrap(kek, sealed)
    except InvalidUnwrap:
        raise InvalidPackage(
            "unwrap", "data key unwrap failed (wrong recipient key or altered wrap)") from None
