"""OpenID Connect bearer tokens: check a JWT signed by the identity provider, say whose it is.

``OidcVerifier.verify`` checks, in order: the compact JWS shape; ``alg`` against an allow-list
(``none`` and HMAC are refused outright: an IdP's keys are public); the signature, with the JWKS
key named by ``kid`` (a token without one may use a set of exactly one key); then ``iss``,
``aud`` (equal to or containing the audience), ``exp`` (required), ``nbf`` and ``iat``, with a
leeway; then ``sub`` and the tenant claim. Every failure is one
``AuthenticationFailed(code="invalid_token")`` whose short message names the failed check and
never carries the token.

The key set comes from a URL (cached for ``cache_ttl_s``), a file or an inline dict. A token
naming an unknown ``kid`` makes the verifier load the set again (the IdP rotated its keys), at
most once per ``min_refresh_s`` so that forged kids cannot make it hammer the IdP; concurrent
verifications share one load, and when a load fails the last good keys stay in use. Time comes
from the injected clock.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from joserfc import jws
from joserfc.errors import (
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
    KeyParameterError,
    MissingClaimError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import Key, KeySet
from joserfc.jwt import JWTClaimsRegistry
from joserfc.util import urlsafe_b64decode

from ..errors import AuthenticationFailed

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_FETCH_TIMEOUT_S = 10.0
_CLAIM_MESSAGES = {"iss": "wrong issuer", "aud": "wrong audience"}


@dataclasses.dataclass(frozen=True)
class OidcConfig:
    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: str | None = None
    jwks: dict | None = None
    tenant_claim: str = "tenant"
    scope_claim: str = "scope"
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: int = 30
    cache_ttl_s: float = 3600
    min_refresh_s: float = 60

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("OIDC needs both an issuer and an audience")
        sources = sum(s is not None for s in (self.jwks_url, self.jwks_file, self.jwks))
        if sources != 1:
            raise ValueError(f"OIDC needs exactly one of jwks_url, jwks_file, jwks; {sources} are set")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError(f"jwks_url must be an http(s) URL, not {self.jwks_url!r}")
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        if not self.algorithms:
            raise ValueError("OIDC needs at least one algorithm")
        for alg in self.algorithms:
            if alg == "none" or alg.startswith("HS"):
                raise ValueError(f"algorithm {alg!r} cannot verify tokens signed with a public key pair")
            if alg not in jws.JWSRegistry.algorithms:
                raise ValueError(f"unknown JWS algorithm {alg!r}")


@dataclasses.dataclass(frozen=True)
class OidcIdentity:
    subject: str
    tenant: str
    scopes: tuple[str, ...]
    expires_at: int


class _Registry(jws.JWSRegistry):
    """Exactly the configured algorithms, without joserfc's per-token deprecation warning: an
    operator who lists "EdDSA" chose it (RFC 9864 renames it; the signatures are unchanged)."""

    def get_alg(self, name: str) -> Any:
        if name not in (self.allowed or ()) or name not in self.algorithms:
            raise UnsupportedAlgorithmError(f"Algorithm of '{name}' is not allowed")
        return self.algorithms[name]


def _fail(message: str) -> AuthenticationFailed:
    return AuthenticationFailed(message, code="invalid_token")


def _find(keys: KeySet, kid: str | None, alg: str) -> Key | None:
    try:
        return keys.get_by_kid(kid, {"alg": alg, "use": "sig"})
    except InvalidKeyIdError:
        return None


class OidcVerifier:
    def __init__(self, config: OidcConfig, *, clock: Callable[[], float] = time.time,
                 http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self._clock = clock
        self._http = http
        self._owns_http = http is None
        self._registry = _Registry(algorithms=config.algorithms, strict_check_header=False)
        self._claims = JWTClaimsRegistry(
            now=lambda: int(self._clock()), leeway=config.leeway_s,
            iss={"essential": True, "value": config.issuer}, aud={"essential": True, "value": config.audience},
            exp={"essential": True}, sub={"essential": True})
        self._keys: KeySet | None = None
        self._loaded_at = 0.0
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        """Three base64url segments whose first decodes to a JSON header with an ``alg``."""
        parts = token.split(".")
        if len(parts) != 3 or not parts[0] or not parts[1] or not all(_SEGMENT.fullmatch(p) for p in parts):
            return False
        try:
            header = json.loads(urlsafe_b64decode(parts[0].encode("ascii")))
        except ValueError:
            return False
        return isinstance(header, dict) and "alg" in header

    async def verify(self, token: str) -> OidcIdentity:
        if not token.isascii():
            raise _fail("malformed token")
        try:
            obj = jws.extract_compact(token.encode("ascii"), registry=self._registry)
        except JoseError as err:
            raise _fail("malformed token") from err
        header = obj.headers()
        if not isinstance(header, dict):
            raise _fail("malformed token")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.config.algorithms:
            raise _fail("algorithm not allowed")
        if kid is not None and not isinstance(kid, str):
            raise _fail("malformed token")
        key = await self._key_for(kid, alg)
        try:
            valid = jws.validate_compact(obj, key, registry=self._registry)
        except KeyParameterError as err:
            raise _fail("signing key does not match algorithm") from err
        except JoseError as err:
            raise _fail("malformed token") from err
        if not valid:
            raise _fail("bad signature")
        return self._identity(obj.payload)

    def seconds_left(self, identity: OidcIdentity) -> float:
        """How long the identity's token is still valid by this verifier's clock (no leeway)."""
        return identity.expires_at - self._clock()

    def _identity(self, payload: bytes | None) -> OidcIdentity:
        try:
            claims = json.loads(payload or b"")
        except ValueError:
            raise _fail("malformed token") from None
        if not isinstance(claims, dict):
            raise _fail("malformed token")
        try:
            self._claims.validate(claims)
        except ExpiredTokenError as err:
            raise _fail("token expired") from err
        except MissingClaimError as err:
            raise _fail(f"missing {err.claim} claim") from err
        except ClaimError as err:
            raise _fail(_CLAIM_MESSAGES.get(err.claim, err.description)) from err
        tenant = claims.get(self.config.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise _fail("missing tenant claim")
        raw = claims.get(self.config.scope_claim)
        if raw is None:
            scopes: tuple[str, ...] = ("tenant",)
        elif isinstance(raw, str):
            scopes = tuple(raw.split())
        elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
            scopes = tuple(raw)
        else:
            raise _fail("invalid scope claim")
        return OidcIdentity(subject=claims["sub"], tenant=tenant, scopes=scopes, expires_at=int(claims["exp"]))

    async def _key_for(self, kid: str | None, alg: str) -> Key:
        seen = self._keys
        if seen is not None and self._clock() - self._loaded_at < self.config.cache_ttl_s:
            key = _find(seen, kid, alg)
            if key is not None:
                return key
        async with self._lock:
            if self._keys is not seen and self._keys is not None:   # another task loaded while we waited
                key = _find(self._keys, kid, alg)
                if key is not None:
                    return key
            now = self._clock()
            if self._attempted_at is None or now - self._attempted_at >= self.config.min_refresh_s:
                await self._refresh(now)
            if self._keys is None:
                raise _fail("signing keys unavailable")
            key = _find(self._keys, kid, alg)
        if key is None:
            raise _fail("unknown signing key")
        return key

    async def _refresh(self, now: float) -> None:
        self._attempted_at = now
        try:
            data = await self._load()
            if not isinstance(data, dict) or not isinstance(data.get("keys"), list) \
                    or not all(isinstance(k, dict) for k in data["keys"]):
                raise ValueError("not a JWKS document")
            keys = KeySet.import_key_set(data)
        except (OSError, ValueError, httpx.HTTPError, JoseError) as err:
            log.warning("could not load the OIDC signing keys (%s): %s", type(err).__name__, err)
            return
        self._keys, self._loaded_at = keys, now

    async def _load(self) -> object:
        config = self.config
        if config.jwks is not None:
            return config.jwks
        if config.jwks_file is not None:
            return json.loads(Path(config.jwks_file).read_text())
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=_FETCH_TIMEOUT_S)
        response = await self._http.get(config.jwks_url, headers={"accept": "application/json"})
        response.raise_for_status()
        return response.json()

    async def close(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None
