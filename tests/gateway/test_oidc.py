"""OIDC bearer tokens: real keys and signatures from joserfc, a real JWKS endpoint (a small
Starlette app on uvicorn, counting its requests) and an injected clock instead of sleeps."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from pathlib import Path

import httpx
import pytest
from joserfc import jws, jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.errors import AuthenticationFailed
from gateway.tenancy.oidc import OidcConfig, OidcIdentity, OidcVerifier
from tests.gateway.conftest import Server

NOW = 1_700_000_000
ISS = "https://idp.example.com"
AUD = "tensafe-gateway"
DROP = object()   # a claim override that removes the claim
KEEP = object()   # the signing key's own kid


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Keys:
    rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
    rsa_impostor = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
    rsa_next = RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})
    ec = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
    ed = OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"})


def jwks(*keys: Key) -> dict:
    return {"keys": [key.as_dict(private=False) for key in keys]}


def claims(**overrides: object) -> dict:
    values = {"iss": ISS, "aud": AUD, "sub": "user-1", "tenant": "acme", "scope": "tenant adapters:write",
              "iat": NOW, "exp": NOW + 300}
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not DROP}


def sign(key: Key, alg: str = "RS256", kid: object = KEEP, **overrides: object) -> str:
    header = {"alg": alg}
    kid = key.kid if kid is KEEP else kid
    if kid is not None:
        header["kid"] = kid
    return jwt.encode(header, claims(**overrides), key, algorithms=[alg])


def b64(data: bytes | dict) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def verifier(*keys: Key, clock: Clock | None = None, **config: object) -> OidcVerifier:
    return OidcVerifier(OidcConfig(ISS, AUD, jwks=jwks(*keys), **config), clock=clock or Clock())


async def rejected(v: OidcVerifier, token: str) -> str:
    with pytest.raises(AuthenticationFailed) as info:
        await v.verify(token)
    error = info.value
    assert (error.status, error.code, error.type) == (401, "invalid_token", "authentication_error")
    if token:
        assert token not in error.message
    return error.message


# --- valid tokens ---------------------------------------------------------------------------

async def test_valid_rsa_token_yields_identity_with_tenant_and_scopes() -> None:
    identity = await verifier(Keys.rsa).verify(sign(Keys.rsa))
    assert identity == OidcIdentity(subject="user-1", tenant="acme", scopes=("tenant", "adapters:write"),
                                    expires_at=NOW + 300)


async def test_valid_ec_token_with_scope_list_and_custom_claims() -> None:
    v = verifier(Keys.ec, tenant_claim="org", scope_claim="scp")
    identity = await v.verify(sign(Keys.ec, "ES256", org="globex", scp=["a", "b"], tenant=DROP, scope=DROP))
    assert (identity.tenant, identity.scopes) == ("globex", ("a", "b"))


async def test_scopes_default_to_tenant_when_absent() -> None:
    identity = await verifier(Keys.rsa).verify(sign(Keys.rsa, scope=DROP))
    assert identity.scopes == ("tenant",)


async def test_invalid_scope_claim_is_refused() -> None:
    assert await rejected(verifier(Keys.rsa), sign(Keys.rsa, scope={"a": 1})) == "invalid scope claim"


async def test_eddsa_token_verifies_without_deprecation_warning() -> None:
    with pytest.warns(SecurityWarning):   # joserfc warns on signing with the RFC 9864-deprecated name
        token = sign(Keys.ed, "EdDSA")
    identity = await verifier(Keys.ed).verify(token)   # -W error: a warning here would fail the test
    assert identity.tenant == "acme"


async def test_audience_list_containing_ours_is_accepted() -> None:
    identity = await verifier(Keys.rsa).verify(sign(Keys.rsa, aud=["other", AUD]))
    assert identity.subject == "user-1"


async def test_token_without_kid_uses_the_only_key_but_not_one_of_several() -> None:
    token = sign(Keys.rsa, kid=None)
    assert (await verifier(Keys.rsa).verify(token)).tenant == "acme"
    assert await rejected(verifier(Keys.rsa, Keys.rsa_next), token) == "unknown signing key"


# --- claims ---------------------------------------------------------------------------------

@pytest.mark.parametrize("aud", ["other", ["other", "another"], []])
async def test_wrong_audience_is_refused(aud: object) -> None:
    assert await rejected(verifier(Keys.rsa), sign(Keys.rsa, aud=aud)) == "wrong audience"


async def test_wrong_issuer_is_refused() -> None:
    assert await rejected(verifier(Keys.rsa), sign(Keys.rsa, iss="https://evil.example.com")) == "wrong issuer"


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "sub"])
async def test_required_claim_missing_is_refused(claim: str) -> None:
    assert await rejected(verifier(Keys.rsa), sign(Keys.rsa, **{claim: DROP})) == f"missing {claim} claim"


@pytest.mark.parametrize("skew, accepted", [(-29, True), (-31, False), (-300, False)])
async def test_expiry_honours_leeway(skew: int, accepted: bool) -> None:
    clock = Clock()
    v = verifier(Keys.rsa, clock=clock)
    token = sign(Keys.rsa, exp=NOW + 100)
    clock.advance(100 - skew)   # now = exp - skew
    if accepted:
        assert (await v.verify(token)).expires_at == NOW + 100
    else:
        assert await rejected(v, token) == "token expired"


@pytest.mark.parametrize("claim, message", [("nbf", "The token is not yet valid"),
                                            ("iat", "The token was issued in the future")])
async def test_not_yet_valid_is_refused_beyond_leeway(claim: str, message: str) -> None:
    v = verifier(Keys.rsa)
    assert (await v.verify(sign(Keys.rsa, **{claim: NOW + 29}))).tenant == "acme"
    assert await rejected(v, sign(Keys.rsa, **{claim: NOW + 31})) == message


@pytest.mark.parametrize("tenant", [DROP, "", 42, ["acme"], None])
async def test_missing_or_invalid_tenant_claim_is_refused(tenant: object) -> None:
    assert await rejected(verifier(Keys.rsa), sign(Keys.rsa, tenant=tenant)) == "missing tenant claim"


# --- signatures and algorithms --------------------------------------------------------------

async def test_signature_by_another_key_with_same_kid_is_refused() -> None:
    assert Keys.rsa_impostor.kid == Keys.rsa.kid
    assert await rejected(verifier(Keys.rsa), sign(Keys.rsa_impostor)) == "bad signature"


async def test_tampered_payload_is_refused() -> None:
    header, _, signature = sign(Keys.rsa).split(".")
    forged = ".".join([header, b64(claims(tenant="victim")), signature])
    assert await rejected(verifier(Keys.rsa), forged) == "bad signature"


async def test_alg_none_is_refused() -> None:
    token = f"{b64({'alg': 'none', 'kid': 'rsa-1'})}.{b64(claims())}."
    assert OidcVerifier.looks_like_jwt(token)
    assert await rejected(verifier(Keys.rsa), token) == "algorithm not allowed"


async def test_hs256_signed_with_the_public_key_is_refused() -> None:
    """The classic confusion: HMAC keyed with the published RSA public key."""
    signing_input = f"{b64({'alg': 'HS256', 'kid': 'rsa-1'})}.{b64(claims())}"
    mac = hmac.new(Keys.rsa.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    assert await rejected(verifier(Keys.rsa), f"{signing_input}.{b64(mac)}") == "algorithm not allowed"


async def test_hs256_with_a_shared_oct_key_in_the_set_is_refused() -> None:
    secret = OctKey.generate_key(256, parameters={"kid": "shared"})
    v = OidcVerifier(OidcConfig(ISS, AUD, jwks={"keys": [secret.as_dict(private=True)]}), clock=Clock())
    assert await rejected(v, sign(secret, "HS256")) == "algorithm not allowed"


async def test_algorithm_outside_the_configured_list_is_refused() -> None:
    assert await rejected(verifier(Keys.ec, algorithms=("RS256",)), sign(Keys.ec, "ES256")) == "algorithm not allowed"


async def test_key_of_the_wrong_type_for_the_algorithm_is_refused() -> None:
    token = sign(Keys.ec, "ES256", kid="rsa-1")   # names the RSA key but is an EC signature
    assert await rejected(verifier(Keys.rsa, Keys.ec), token) == "signing key does not match algorithm"


async def test_unknown_kid_is_refused() -> None:
    assert await rejected(verifier(Keys.rsa), sign(Keys.rsa_next)) == "unknown signing key"


async def test_signed_payload_that_is_not_a_claims_object_is_refused() -> None:
    token = jws.serialize_compact({"alg": "RS256", "kid": "rsa-1"}, b"[1, 2]", Keys.rsa)
    assert await rejected(verifier(Keys.rsa), token) == "malformed token"


GARBAGE = {
    "empty": "",
    "api key": "tsk-abcdefghijklmnop",
    "three letters": "a.b.c",
    "dots": "...",
    "four segments": "a.b.c.d",
    "non-ascii": "é.é.é",
    "header not json": f"{b64(b'nope')}.{b64(claims())}.sig",
    "header a json string": b64(b'"alg"') + f".{b64(claims())}.sig",
    "header without alg": f"{b64({'kid': 'rsa-1'})}.{b64(claims())}.sig",
    "kid not a string": f"{b64({'alg': 'RS256', 'kid': 5})}.{b64(claims())}.sig",
    "unknown crit header": f"{b64({'alg': 'RS256', 'kid': 'rsa-1', 'crit': ['x'], 'x': 1})}.{b64(claims())}.sig",
    "payload not base64": f"{b64({'alg': 'RS256', 'kid': 'rsa-1'})}.%%%.sig",
    "oversized": f"{b64({'alg': 'RS256', 'kid': 'rsa-1'})}.{'A' * 200_000}.sig",
}


@pytest.mark.parametrize("token", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_is_refused_as_malformed(token: str) -> None:
    assert await rejected(verifier(Keys.rsa), token) == "malformed token"


@pytest.mark.parametrize("token", ["", "tsk-abc", "a.b.c", "a.b", "a.b.c.d", f"{b64({'kid': 'x'})}.e30.sig",
                                   f"{b64({'alg': 'RS256'})}..sig", "ab+c.de/f.x", "é.é.é"])
def test_looks_like_jwt_rejects_non_jwts(token: str) -> None:
    assert not OidcVerifier.looks_like_jwt(token)


def test_looks_like_jwt_accepts_signed_tokens() -> None:
    assert OidcVerifier.looks_like_jwt(sign(Keys.rsa))
    assert OidcVerifier.looks_like_jwt(sign(Keys.ec, "ES256"))


# --- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"jwks": {"keys": []}, "jwks_file": "/x"}, "exactly one"),
    ({"jwks_url": "file:///etc/jwks.json"}, "http"),
    ({"jwks": {"keys": []}, "algorithms": ("RS256", "HS256")}, "HS256"),
    ({"jwks": {"keys": []}, "algorithms": ("none",)}, "none"),
    ({"jwks": {"keys": []}, "algorithms": ("RS257",)}, "unknown"),
    ({"jwks": {"keys": []}, "algorithms": ()}, "at least one"),
])
def test_config_rejects_unsafe_or_ambiguous_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OidcConfig(ISS, AUD, **kwargs)


# --- key sets from a file -------------------------------------------------------------------

async def test_jwks_from_file_and_rotation_in_place(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(Keys.rsa)))
    clock = Clock()
    v = OidcVerifier(OidcConfig(ISS, AUD, jwks_file=str(path)), clock=clock)
    assert (await v.verify(sign(Keys.rsa))).tenant == "acme"
    path.write_text(json.dumps(jwks(Keys.rsa, Keys.rsa_next)))
    clock.advance(60)
    assert (await v.verify(sign(Keys.rsa_next, tenant="initech"))).tenant == "initech"


async def test_missing_jwks_file_means_no_keys(tmp_path: Path) -> None:
    v = OidcVerifier(OidcConfig(ISS, AUD, jwks_file=str(tmp_path / "absent.json")), clock=Clock())
    assert await rejected(v, sign(Keys.rsa)) == "signing keys unavailable"


# --- key sets from a URL --------------------------------------------------------------------

class Idp:
    """The JWKS endpoint's state; the server thread counts requests, the tests read the count."""

    def __init__(self) -> None:
        self.url = ""
        self.reset()

    def reset(self) -> None:
        self.jwks, self.status, self.requests = jwks(Keys.rsa), 200, 0

    async def endpoint(self, request: Request) -> JSONResponse:
        self.requests += 1
        return JSONResponse(self.jwks, status_code=self.status)


@pytest.fixture(scope="module")
def idp_server():
    idp = Idp()
    with Server(Starlette(routes=[Route("/jwks", idp.endpoint)])) as server:
        idp.url = f"{server.url}/jwks"
        yield idp


@pytest.fixture()
def idp(idp_server: Idp) -> Idp:
    idp_server.reset()
    return idp_server


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
async def remote(idp: Idp, clock: Clock):
    v = OidcVerifier(OidcConfig(ISS, AUD, jwks_url=idp.url), clock=clock)
    yield v
    await v.close()


async def test_jwks_url_is_fetched_once_and_cached(idp: Idp, remote: OidcVerifier) -> None:
    for tenant in ("a", "b", "c"):
        assert (await remote.verify(sign(Keys.rsa, tenant=tenant))).tenant == tenant
    assert idp.requests == 1


async def test_jwks_is_fetched_again_after_cache_ttl(idp: Idp, remote: OidcVerifier, clock: Clock) -> None:
    token = sign(Keys.rsa, exp=NOW + 10_000)
    await remote.verify(token)
    clock.advance(3599)
    await remote.verify(token)
    assert idp.requests == 1
    clock.advance(1)
    await remote.verify(token)
    assert idp.requests == 2


async def test_concurrent_first_verifications_share_one_fetch(idp: Idp) -> None:
    v = OidcVerifier(OidcConfig(ISS, AUD, jwks_url=idp.url, min_refresh_s=0), clock=Clock())
    try:
        identities = await asyncio.gather(*(v.verify(sign(Keys.rsa)) for _ in range(5)))
    finally:
        await v.close()
    assert [i.tenant for i in identities] == ["acme"] * 5
    assert idp.requests == 1


async def test_key_rotation_triggers_one_shared_refetch(idp: Idp, remote: OidcVerifier, clock: Clock) -> None:
    await remote.verify(sign(Keys.rsa))
    idp.jwks = jwks(Keys.rsa, Keys.rsa_next)
    clock.advance(60)
    token = sign(Keys.rsa_next, tenant="rotated")
    identities = await asyncio.gather(*(remote.verify(token) for _ in range(5)))
    assert {i.tenant for i in identities} == {"rotated"}
    assert idp.requests == 2
    assert (await remote.verify(sign(Keys.rsa))).tenant == "acme"   # the old key still verifies
    assert idp.requests == 2


async def test_unknown_kid_refetch_is_rate_limited(idp: Idp, remote: OidcVerifier, clock: Clock) -> None:
    await remote.verify(sign(Keys.rsa))
    idp.jwks = jwks(Keys.rsa, Keys.rsa_next)
    token = sign(Keys.rsa_next)
    assert await rejected(remote, token) == "unknown signing key"
    clock.advance(59)
    assert await rejected(remote, token) == "unknown signing key"
    assert idp.requests == 1
    clock.advance(1)
    assert (await remote.verify(token)).subject == "user-1"
    assert idp.requests == 2
    ghost = sign(RSAKey.generate_key(2048, parameters={"kid": "ghost"}))
    assert await rejected(remote, ghost) == "unknown signing key"
    assert idp.requests == 2


async def test_failed_refresh_keeps_the_last_good_keys(idp: Idp, remote: OidcVerifier, clock: Clock,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    token = sign(Keys.rsa, exp=NOW + 10_000)
    await remote.verify(token)
    idp.status = 503
    clock.advance(3600)
    assert (await remote.verify(token)).tenant == "acme"
    assert (await remote.verify(token)).tenant == "acme"
    assert idp.requests == 2   # one failed try, then rate-limited
    assert "could not load the OIDC signing keys" in caplog.text


async def test_unreachable_jwks_means_no_keys_and_limited_retries(idp: Idp, remote: OidcVerifier) -> None:
    idp.status = 500
    assert await rejected(remote, sign(Keys.rsa)) == "signing keys unavailable"
    assert await rejected(remote, sign(Keys.rsa)) == "signing keys unavailable"
    assert idp.requests == 1


async def test_injected_http_client_is_left_open(idp: Idp) -> None:
    async with httpx.AsyncClient() as http:
        v = OidcVerifier(OidcConfig(ISS, AUD, jwks_url=idp.url), clock=Clock(), http=http)
        assert (await v.verify(sign(Keys.rsa))).tenant == "acme"
        await v.close()
        assert not http.is_closed
        assert (await http.get(idp.url)).status_code == 200
    assert idp.requests == 2
