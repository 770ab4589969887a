"""Authentication before tenancy: one API key from settings protects /v1/*.

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` (constant time, and the
plaintext key is not kept in the authenticator). When no key is configured, a development key
is generated once into ``data_dir/dev-api-key`` (mode 0600) and reused on later starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .errors import AuthenticationFailed

KEY_PREFIX = "tsk-"
DEV_KEY_FILE = "dev-api-key"


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    tenant: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeyAuth:
    def __init__(self, key: str, tenant: str = "default") -> None:
        self._digest = _digest(key)
        self._principal = Principal(tenant)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed("Missing API key: send it as 'Authorization: Bearer <key>'.",
                                       code="missing_api_key")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        if not hmac.compare_digest(_digest(key.strip()), self._digest):
            raise AuthenticationFailed("Incorrect API key provided.")
        return self._principal


def ensure_dev_key(data_dir: Path) -> tuple[str, Path, bool]:
    """The development key: read from ``data_dir``, or created there (0600). Returns
    (key, path, created)."""
    path = Path(data_dir) / DEV_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        existing = path.read_text().strip()
        if existing:
            return existing, path, False
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, path, True
