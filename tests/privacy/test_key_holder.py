"""The key holder over real HTTP: it refuses a wrong or missing credential (401) and malformed
bodies (400, JSON errors), and decrypts for the right credential."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
import tenseal as ts

from privacy import wire
from privacy.client import KeyHolderClient, KeyHolderError
from privacy.keyholder import BUNDLE

from .conftest import TOKEN


def post(url: str, path: str, body: bytes, token: str | None = TOKEN, *, authorization: str | None = None
         ) -> httpx.Response:
    headers = {"content-type": BUNDLE}
    if authorization is not None:
        headers["authorization"] = authorization
    elif token is not None:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(url + path, content=body, headers=headers, timeout=30)


def error_kind(r: httpx.Response) -> str:
    assert r.headers["content-type"] == "application/json"
    return r.json()["error"]["kind"]


def stage_two(secret_ctx, values: list[float]) -> bytes:
    """A valid decrypt body: one 'stage-2' ciphertext of rank 1 and width len(values)."""
    return wire.pack({"rank": 1, "width": len(values)}, [ts.ckks_vector(secret_ctx, values).serialize()])


@pytest.mark.parametrize("path", ["/v1/refresh", "/v1/decrypt"])
@pytest.mark.parametrize("authorization", [None, "Bearer hetok-wrong", f"Bearer {TOKEN}x", "Bearer", TOKEN,
                                           f"Basic {TOKEN}"])
def test_wrong_or_missing_credential_is_401(key_holder, secret_ctx, path, authorization) -> None:
    r = post(key_holder, path, stage_two(secret_ctx, [1.0, 2.0]), token=None, authorization=authorization)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert error_kind(r) == "unauthorized"
    assert TOKEN not in r.text


def test_right_credential_decrypts_and_a_second_token_works(key_holder, secret_ctx) -> None:
    values = [0.5, -1.25, 3.0]
    for token in (TOKEN, "hetok-second-11aa"):
        r = post(key_holder, "/v1/decrypt", stage_two(secret_ctx, values), token=token)
        assert r.status_code == 200, r.text
        header, blobs = wire.unpack(r.content, max_blobs=1)
        assert header["shape"] == [1, 3]
        assert np.allclose(np.frombuffer(blobs[0], "<f8"), values, atol=1e-6)
    assert httpx.get(key_holder + "/health").json() == {"status": "ok"}


def test_refresh_adds_partial_sums_and_encrypts_y_repeated(key_holder, secret_ctx) -> None:
    # rank 2: partial sums (1, 2), (3, 4) -> y = (4, 6), repeated 3 times each (width 3)
    body = wire.pack({"rank": 2, "width": 3}, [ts.ckks_vector(secret_ctx, [1.0, 2.0, 3.0, 4.0]).serialize()])
    r = post(key_holder, "/v1/refresh", body)
    assert r.status_code == 200, r.text
    _, blobs = wire.unpack(r.content, max_blobs=8)
    assert len(blobs) == 1
    assert np.allclose(ts.ckks_vector_from(secret_ctx, blobs[0]).decrypt(), [4, 4, 4, 6, 6, 6], atol=1e-6)


@pytest.mark.parametrize("path", ["/v1/refresh", "/v1/decrypt"])
@pytest.mark.parametrize("make, message", [
    (lambda ctx: b"", "bad magic"),
    (lambda ctx: b"not a bundle at all", "bad magic"),
    (lambda ctx: wire.MAGIC + b"\xff\xff\x00\x00{}", "out of bounds"),
    (lambda ctx: wire.pack({"rank": 1, "width": 2}, [b"x" * 100])[:-10], "add up"),
    (lambda ctx: wire.pack({"rank": 1, "width": 2}, []), "no ciphertexts"),
    (lambda ctx: wire.pack({"rank": 1, "width": 2}, [b"garbage" * 50]), "not a ciphertext"),
    (lambda ctx: wire.pack({"rank": 0, "width": 2}, [ts.ckks_vector(ctx, [1.0, 2.0]).serialize()]), "rank"),
    (lambda ctx: wire.pack({"rank": 1, "width": "2"}, [ts.ckks_vector(ctx, [1.0, 2.0]).serialize()]), "width"),
    (lambda ctx: wire.pack({"rank": 3, "width": 1}, [ts.ckks_vector(ctx, [1.0, 2.0]).serialize()]), "slots"),
    (lambda ctx: wire.pack({"rank": 1, "width": 2}, [ts.ckks_vector(
        ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40]), [1.0], scale=2.0**20).serialize()]),
     "not a ciphertext"),
])
def test_malformed_body_is_a_400_json_error(key_holder, secret_ctx, path, make, message) -> None:
    r = post(key_holder, path, make(secret_ctx))
    assert r.status_code == 400, r.text
    assert error_kind(r) == "invalid_request"
    assert message in r.json()["error"]["message"]


def test_client_raises_the_key_holders_refusal(key_holder, secret_ctx) -> None:
    with KeyHolderClient(key_holder, "hetok-wrong") as bad, pytest.raises(KeyHolderError) as info:
        bad.decrypt([ts.ckks_vector(secret_ctx, [1.0]).serialize()], 1, 1)
    assert info.value.status == 401
    assert "hetok-wrong" not in repr(bad)
    with KeyHolderClient(key_holder, TOKEN) as good, pytest.raises(KeyHolderError) as info:
        good.decrypt([b"junk"], 1, 1)
    assert info.value.status == 400
