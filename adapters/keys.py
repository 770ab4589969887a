"""Public face of TSSP keys: generation, PEM round trips, key directories, and the JSON
document in which the gateway publishes its recipient public keys.

The classes live in ``keypairs`` and the directory I/O in ``keyfiles``; this module is what
callers import. Recipient key document (``GET /v1/tssp/recipient``, SPEC.md §6.3)::

    {"data": [{"key_id": "<hex>", "x25519_pem": "<PEM>", "mlkem768_pem": "<PEM>",
               "created": <unix seconds>, "current": true}, ...]}

Exactly one entry is ``current``: tenants wrap new packages to it; the gateway still opens
packages wrapped to every listed key (rotation).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import KeyFileError
from .keyfiles import (
    load_recipient_private,
    load_recipient_public,
    load_signing_private,
    load_signing_public,
    save_recipient_key,
    save_signing_key,
)
from .keypairs import (
    RecipientPrivateKey,
    RecipientPublicKey,
    SigningPrivateKey,
    SigningPublicKey,
    generate_recipient_key,
    generate_signing_key,
)

__all__ = [
    "SigningPrivateKey",
    "SigningPublicKey",
    "RecipientPrivateKey",
    "RecipientPublicKey",
    "generate_signing_key",
    "generate_recipient_key",
    "save_signing_key",
    "load_signing_private",
    "load_signing_public",
    "save_recipient_key",
    "load_recipient_private",
    "load_recipient_public",
    "recipient_key_entry",
    "current_recipient_from_document",
]


def recipient_key_entry(key: RecipientPublicKey, *, created: int, current: bool) -> dict[str, Any]:
    """One ``data`` entry of the recipient key document (PEMs as text)."""
    pems = key.to_pems()
    return {
        "key_id": key.key_id,
        "x25519_pem": pems["x25519_pem"].decode("ascii"),
        "mlkem768_pem": pems["mlkem768_pem"].decode("ascii"),
        "created": int(created),
        "current": bool(current),
    }


def current_recipient_from_document(document: Any) -> RecipientPublicKey:
    """The ``current`` key of a recipient key document, checked against its ``key_id``."""
    data = document.get("data") if isinstance(document, Mapping) else None
    if not isinstance(data, list):
        raise KeyFileError('recipient key document must be an object with a "data" list')
    current = [e for e in data if isinstance(e, Mapping) and e.get("current") is True]
    if len(current) != 1:
        raise KeyFileError(f"recipient key document must mark exactly one entry current, "
                           f"found {len(current)}")
    entry = current[0]
    pems = [entry.get("x25519_pem"), entry.get("mlkem768_pem")]
    if not all(isinstance(p, str) for p in pems):
        raise KeyFileError('current recipient entry lacks "x25519_pem"/"mlkem768_pem" strings')
    key = RecipientPublicKey.from_pems(pems[0].encode("ascii", "replace"),
                                       pems[1].encode("ascii", "replace"))
    if entry.get("key_id") != key.key_id:
        raise KeyFileError(f"current recipient entry's key_id {entry.get('key_id')!r} does not "
                           f"match its keys ({key.key_id})")
    return key
