"""Hybrid package signatures: Ed25519 and ML-DSA-65 over the same bytes; both must verify.

Domain separation: ML-DSA-65 takes ``SIGNATURE_CONTEXT`` as its FIPS 204 context string;
Ed25519 (which has no context parameter in pure mode) signs ``SIGNATURE_CONTEXT || 0x00 ||
message``. A signature made for TSSP therefore never verifies as a signature for anything else
made with the same key, and vice versa.
"""
from __future__ import annotations

from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature

from .keypairs import SigningPrivateKey, SigningPublicKey

SIGNATURE_CONTEXT = b"tensafe/tssp/v1/package-signature"
ED25519_SIGNATURE_LENGTH = 64
MLDSA65_SIGNATURE_LENGTH = 3309


def _ed25519_message(message: bytes) -> bytes:
    return SIGNATURE_CONTEXT + b"\x00" + message


def sign(key: SigningPrivateKey, message: bytes) -> tuple[bytes, bytes]:
    """Return ``(ed25519_signature, mldsa65_signature)`` over ``message``."""
    return (
        key.ed25519.sign(_ed25519_message(message)),
        key.mldsa65.sign(message, SIGNATURE_CONTEXT),
    )


def verify(key: SigningPublicKey, message: bytes, ed25519_sig: bytes, mldsa65_sig: bytes) -> bool:
    """True only if both signatures verify under ``key``. Ed25519 goes first: it is cheaper."""
    try:
        key.ed25519.verify(ed25519_sig, _ed25519_message(message))
        key.mldsa65.verify(mldsa65_sig, message, SIGNATURE_CONTEXT)
    except InvalidSignature:
        return False
    return True


def find_verifying_signer(key_id: str, trusted: Sequence[SigningPublicKey], message: bytes,
                          ed25519_sig: bytes, mldsa65_sig: bytes) -> SigningPublicKey | None:
    """The first trusted key with id ``key_id`` under which both signatures verify."""
    for key in trusted:
        if key.key_id == key_id and verify(key, message, ed25519_sig, mldsa65_sig):
            return key
    return None
