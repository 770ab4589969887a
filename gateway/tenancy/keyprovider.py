"""Where the gateway's secrets come from: the recipient keys that unwrap package data keys
(several; the newest is current, older ones stay readable after rotation) and the key that
hashes API keys.

``dir`` (default): a directory of 0600 files created on first start::

    KEYS/hashing.key                      32 random bytes
    KEYS/recipients/<created>-<key id>/   one recipient key directory each (adapters.keys layout)

``env``: ``TENSAFE_HASHING_KEY`` (hex) and ``TENSAFE_RECIPIENT_KEYS`` (comma-separated
``created:base64(private key bytes)``, newest last), for platforms that inject secrets.
Losing these keys makes every stored package unreadable and every API key invalid: back the
directory up (README, "Keys").
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from adapters.keys import RecipientPrivateKey, generate_recipient_key, load_recipient_private, save_recipient_key


class KeyProviderError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class RecipientKey:
    private: RecipientPrivateKey
    created: int

    @property
    def key_id(self) -> str:
        return self.private.key_id


class KeyProvider(Protocol):
    def hashing_key(self) -> bytes: ...

    def recipient_keys(self) -> list[RecipientKey]:
        """Oldest first; the last one is current."""

    def rotate_recipient(self) -> RecipientKey:
        """Add a new current recipient key; older keys keep opening existing packages."""


class DirectoryKeyProvider:
    def __init__(self, root: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.clock = clock
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._hashing = self._load_or_create_hashing_key()
        self._recipients = self._load_recipients()
        if not self._recipients:
            self.rotate_recipient()

    def _load_or_create_hashing_key(self) -> bytes:
        path = self.root / "hashing.key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            data = path.read_bytes()
            if len(data) != 32:
                raise KeyProviderError(f"{path} must hold 32 bytes, found {len(data)}") from None
            return data
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def _load_recipients(self) -> list[RecipientKey]:
        folder = self.root / "recipients"
        if not folder.is_dir():
            return []
        keys = []
        for entry in sorted(folder.iterdir()):
            created = int(entry.name.partition("-")[0])
            keys.append(RecipientKey(load_recipient_private(entry), created))
        return keys

    def hashing_key(self) -> bytes:
        return self._hashing

    def recipient_keys(self) -> list[RecipientKey]:
        return list(self._recipients)

    def rotate_recipient(self) -> RecipientKey:
        created = int(self.clock())
        if self._recipients:
            created = max(created, self._recipients[-1].created + 1)  # keeps the order strict
        key = generate_recipient_key()
        (self.root / "recipients").mkdir(mode=0o700, exist_ok=True)
        save_recipient_key(self.root / "recipients" / f"{created:012d}-{key.key_id[:16]}", key)
        entry = RecipientKey(key, created)
        self._recipients.append(entry)
        return entry


class EnvKeyProvider:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        try:
            self._hashing = bytes.fromhex(env["TENSAFE_HASHING_KEY"])
            self._recipients = []
            for item in filter(None, env["TENSAFE_RECIPIENT_KEYS"].split(",")):
                created, _, blob = item.strip().partition(":")
                self._recipients.append(RecipientKey(RecipientPrivateKey.from_bytes(base64.b64decode(blob)),
                                                     int(created)))
        except KeyError as exc:
            raise KeyProviderError(f"{exc.args[0]} is not set") from None
        except (ValueError, binascii.Error):
            raise KeyProviderError("TENSAFE_HASHING_KEY / TENSAFE_RECIPIENT_KEYS are malformed") from None
        if len(self._hashing) < 32 or not self._recipients:
            raise KeyProviderError("need a hashing key of >= 32 bytes and at least one recipient key")

    def hashing_key(self) -> bytes:
        return self._hashing

    def recipient_keys(self) -> list[RecipientKey]:
        return list(self._recipients)

    def rotate_recipient(self) -> RecipientKey:
        raise KeyProviderError("keys from the environment are rotated where they are defined")


PROVIDERS: dict[str, Callable[[Path], KeyProvider]] = {
    "dir": lambda data_dir: DirectoryKeyProvider(data_dir / "keys"),
    "env": lambda data_dir: EnvKeyProvider(),
}
