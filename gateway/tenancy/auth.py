"""Who is calling: API keys (stored only as keyed hashes), OIDC bearer JWTs, and the
bootstrap admin credential from settings.

An API key is ``tsk-`` followed by 43 random URL-safe characters. The store keeps its
HMAC-SHA256 under the gateway's hashing key (so a stolen database cannot be used to check
guesses offline) and its first 12 characters to identify it in listings.

An accepted key's principal is remembered for ``cache_ttl_s`` (keyed by the digest, never the
key; see ``remembered``), so a busy key costs one HMAC per request instead of two store
lookups; so is a verified OIDC token's, but never past the token's expiry. Revoking a key,
changing a tenant or deleting one through this process forgets every remembered principal at
once (``forget``); another replica sharing the store sees such a change within
``cache_ttl_s``. Refusals are never remembered.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AuthenticationFailed, PermissionDenied
from ..store import ApiKeyRecord, Store
from .quotas import QuotaLimits
from .remembered import Remembered

if TYPE_CHECKING:
    from .oidc import OidcVerifier

KEY_PREFIX = "tsk-"
PREFIX_CHARS = 12


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    tenant: str | None  # None: an operator (admin) credential
    scopes: tuple[str, ...]
    subject: str  # key id, JWT subject or "bootstrap-admin"
    limits: QuotaLimits = QuotaLimits()  # the tenant's quotas
    incarnation: str = ""  # the tenant's (see store.Tenant): usage is only ever counted to it

    def require(self, scope: str) -> None:
        """``admin`` may do anything; ``tenant-admin`` includes ``tenant``."""
        implied = set(self.scopes) | ({"tenant"} if "tenant-admin" in self.scopes else set())
        if scope not in implied and "admin" not in implied:
            raise PermissionDenied(f"This credential lacks the '{scope}' scope.")

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, store: Store, hashing_key: bytes, *, admin_key: str | None = None,
                 oidc: "OidcVerifier | None" = None, cache_ttl_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._hashing_key = hashing_key
        self._admin_digest = self.digest(admin_key) if admin_key else None
        self.oidc = oidc
        self._remembered: Remembered[str, Principal] = Remembered(cache_ttl_s, clock)  # by digest

    def digest(self, key: str) -> str:
        return hmac.digest(self._hashing_key, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hex()

    def forget(self) -> None:
        """Drop every remembered principal: a key was revoked or a tenant changed."""
        self._remembered.clear()

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed("Missing API key: send it as 'Authorization: Bearer <key>'.",
                                       code="missing_api_key")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
        oidc = self.oidc
        if oidc is not None and (token.startswith(KEY_PREFIX) or not oidc.looks_like_jwt(token)):
            oidc = None  # an API key
        digest = self.digest(token)
        if oidc is None and self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return Principal(None, ("admin",), "bootstrap-admin")
        principal = self._remembered.get(digest)
        if principal is not None:
            return principal
        generation = self._remembered.token()
        if oidc is not None:  # a JWT is remembered no longer than it is valid
            identity = await oidc.verify(token)
            principal = await self._tenant_principal(identity.tenant, identity.scopes, f"oidc:{identity.subject}")
            self._remembered.put(digest, principal, generation, ttl_s=oidc.seconds_left(identity))
        else:
            principal = await self._from_store(digest)
            self._remembered.put(digest, principal, generation)
        return principal

    async def _from_store(self, digest: str) -> Principal:
        record = await self.store.api_key_by_digest(digest)
        if record is None or record.revoked is not None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if record.tenant is None:
            return Principal(None, record.scopes, record.id)
        return await self._tenant_principal(record.tenant, record.scopes, record.id)

    async def _tenant_principal(self, tenant_id: str, scopes: tuple[str, ...], subject: str) -> Principal:
        """A tenant's caller, with the tenant's quotas; refused when the tenant is gone or suspended."""
        tenant = await self.store.get_tenant(tenant_id)
        if tenant is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        if tenant.suspended:
            raise PermissionDenied("This tenant is suspended.", code="tenant_suspended")
        return Principal(tenant_id, scopes, subject, QuotaLimits.stored(tenant.quotas), tenant.incarnation)

    async def issue(self, tenant: str | None, scopes: tuple[str, ...], name: str,
                    key: str | None = None) -> tuple[str, ApiKeyRecord]:
        """Create a key (or register ``key``); the plaintext is returned once and never stored."""
        key = key or new_api_key()
        record = ApiKeyRecord(id="key_" + secrets.token_hex(8), tenant=tenant, prefix=key[:PREFIX_CHARS],
                              digest=self.digest(key), scopes=scopes, name=name, created=int(time.time()))
        await self.store.add_api_key(record)
        return key, record


def write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` to a new or existing file readable by the owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
