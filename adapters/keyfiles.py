"""Key directories: one PEM file per algorithm and half, plus a ``key_id`` file.

Layout (SPEC.md §6)::

    signing key DIR/                      recipient key DIR/
      ed25519_private.pem   0600            x25519_private.pem     0600
      ed25519_public.pem    0644            x25519_public.pem      0644
      mldsa65_private.pem   0600            mlkem768_private.pem   0600
      mldsa65_public.pem    0644            mlkem768_public.pem    0644
      key_id                0644            key_id                 0644

Private files are created by ``os.open(..., O_CREAT | O_EXCL, 0o600)``: they are never readable
by others, not even for the instant a later ``chmod`` would leave open, and an existing key is
never overwritten. A directory holding only the public files (what a tenant hands over) loads
as a public key. ``key_id`` lets a load notice a public file that was edited or swapped.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Callable, TypeVar

from .errors import KeyFileError
from .keypairs import (
    RecipientPrivateKey,
    RecipientPublicKey,
    SigningPrivateKey,
    SigningPublicKey,
)

_log = logging.getLogger("adapters.keys")

MAX_KEY_FILE_BYTES = 64 * 1024
KEY_ID_FILE = "key_id"
SIGNING_FILES = ("ed25519", "mldsa65")
RECIPIENT_FILES = ("x25519", "mlkem768")

K = TypeVar("K")


def _private_name(alg: str) -> str:
    return f"{alg}_private.pem"


def _public_name(alg: str) -> str:
    return f"{alg}_public.pem"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileError("already exists; refusing to overwrite a key", path) from None
    except OSError as exc:
        raise KeyFileError(f"cannot create ({exc.strerror})", path) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError("missing key file", path) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read ({exc.strerror})", path) from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"larger than {MAX_KEY_FILE_BYTES} bytes: not a key file", path)
    return data


def _save(directory: str | os.PathLike[str], algs: tuple[str, str], private_pems: dict[str, bytes],
          public_pems: dict[str, bytes], key_id: str) -> Path:
    root = Path(directory)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory ({exc.strerror})", root) from None
    names = [_private_name(a) for a in algs] + [_public_name(a) for a in algs] + [KEY_ID_FILE]
    existing = [n for n in names if (root / n).exists()]
    if existing:
        raise KeyFileError(
            f"already holds {', '.join(existing)}; refusing to overwrite a key", root)
    for alg, pem in zip(algs, private_pems.values()):
        _write_new(root / _private_name(alg), pem, 0o600)
    for alg, pem in zip(algs, public_pems.values()):
        _write_new(root / _public_name(alg), pem, 0o644)
    _write_new(root / KEY_ID_FILE, key_id.encode() + b"\n", 0o644)
    return root


def _check_key_id(root: Path, key_id: str) -> None:
    path = root / KEY_ID_FILE
    if not path.exists():
        return
    recorded = _read(path).decode("ascii", "replace").strip()
    if recorded != key_id:
        raise KeyFileError(
            f"recorded key id {recorded[:16]}... does not match the key files "
            f"({key_id[:16]}...): a key file was changed or swapped", path)


def _warn_if_exposed(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        _log.warning("private key file %s has mode %04o; it should be 0600", path, mode)


def _load_public(directory: str | os.PathLike[str], algs: tuple[str, str],
                 build: Callable[[bytes, bytes], K]) -> K:
    root = Path(directory)
    if not root.is_dir():
        raise KeyFileError("not a key directory", root)
    key = build(*(_read(root / _public_name(a)) for a in algs))
    _check_key_id(root, key.key_id)  # type: ignore[attr-defined]
    return key


def _load_private(directory: str | os.PathLike[str], algs: tuple[str, str],
                  build: Callable[[bytes, bytes], K]) -> K:
    root = Path(directory)
    if not root.is_dir():
        raise KeyFileError("not a key directory", root)
    paths = [root / _private_name(a) for a in algs]
    for path in paths:
        _warn_if_exposed(path)
    key = build(*(_read(p) for p in paths))
    public = key.public_key()  # type: ignore[attr-defined]
    on_disk = public.to_pems()
    for alg, pem in zip(algs, on_disk.values()):
        path = root / _public_name(alg)
        if path.exists() and _normalise(_read(path)) != _normalise(pem):
            raise KeyFileError("public key file does not match the private key beside it", path)
    _check_key_id(root, public.key_id)
    return key


def _normalise(pem: bytes) -> bytes:
    return b"".join(pem.split())


def save_signing_key(directory: str | os.PathLike[str], key: SigningPrivateKey) -> Path:
    """Write a new signing key directory; refuses to overwrite. Returns the directory."""
    return _save(directory, SIGNING_FILES, key.to_pems(), key.public_key().to_pems(), key.key_id)


def save_recipient_key(directory: str | os.PathLike[str], key: RecipientPrivateKey) -> Path:
    """Write a new recipient key directory; refuses to overwrite. Returns the directory."""
    return _save(directory, RECIPIENT_FILES, key.to_pems(), key.public_key().to_pems(), key.key_id)


def load_signing_private(directory: str | os.PathLike[str]) -> SigningPrivateKey:
    return _load_private(directory, SIGNING_FILES, SigningPrivateKey.from_pems)


def load_signing_public(directory: str | os.PathLike[str]) -> SigningPublicKey:
    return _load_public(directory, SIGNING_FILES, SigningPublicKey.from_pems)


def load_recipient_private(directory: str | os.PathLike[str]) -> RecipientPrivateKey:
    return _load_private(directory, RECIPIENT_FILES, RecipientPrivateKey.from_pems)


def load_recipient_public(directory: str | os.PathLike[str]) -> RecipientPublicKey:
    return _load_public(directory, RECIPIENT_FILES, RecipientPublicKey.from_pems)
