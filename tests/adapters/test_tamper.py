"""Every way of damaging a package ends in the one opaque InvalidPackage, at the intended check."""
from __future__ import annotations

import hashlib
import json
import random
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import format as fmt
from adapters import payload
from adapters.errors import InvalidPackage
from adapters.keys import RecipientPrivateKey, SigningPrivateKey
from adapters.limits import Limits
from adapters.manifest import Manifest
from adapters.package import inspect, open_package

from .builders import seal


def _opener(signer: SigningPrivateKey, recipient: RecipientPrivateKey):
    trusted, keys = [signer.public_key()], [recipient]

    def attempt(data: bytes) -> InvalidPackage | None:
        try:
            open_package(data, trusted_signers=trusted, recipient_keys=keys, verify_digest=True)
        except InvalidPackage as exc:
            return exc
        return None
    return attempt


def _boundaries(data: bytes) -> dict[str, tuple[int, int]]:
    s = fmt.parse(data, Limits())
    h = s.header
    spans, start = {}, 0
    for name, length in (("header", fmt.HEADER_LENGTH), ("manifest", h.manifest_length),
                         ("wrapped_key", h.wrapped_key_length), ("nonce", fmt.NONCE_LENGTH),
                         ("ciphertext", h.payload_length), ("tag", fmt.TAG_LENGTH),
                         ("ed25519_sig", h.ed25519_sig_length), ("mldsa65_sig", h.mldsa65_sig_length)):
        spans[name] = (start, start + length)
        start += length
    assert start == len(data)
    return spans


def test_small_package_opens(small_package: bytes, signer_a, recipient) -> None:
    assert _opener(signer_a, recipient)(small_package) is None


def test_every_single_byte_flip_outside_the_ciphertext_is_rejected_before_decryption(
        small_package: bytes, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey) -> None:
    attempt = _opener(signer_a, recipient)
    spans = _boundaries(small_package)
    checks: dict[str, set[str]] = {}
    flipped = 0
    for section, (start, end) in spans.items():
        if section == "ciphertext":
            continue
        for i in range(start, end):
            data = bytearray(small_package)
            data[i] ^= 0xFF
            err = attempt(bytes(data))
            assert err is not None, f"flip at {i} ({section}) was accepted"
            assert str(err) == "invalid package"
            checks.setdefault(section, set()).add(err.check)
            flipped += 1
    assert flipped > 3309 + 1160 + 96
    assert checks["header"] <= {"bounds", "signature"}
    for section in ("manifest", "wrapped_key", "nonce", "tag", "ed25519_sig", "mldsa65_sig"):
        assert checks[section] == {"signature"}, section


def test_sampled_ciphertext_flips_fail_authentication(
        small_package: bytes, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey) -> None:
    attempt = _opener(signer_a, recipient)
    start, end = _boundaries(small_package)["ciphertext"]
    rng = random.Random(7)
    positions = {start, end - 1, *rng.sample(range(start, end), 200)}
    for i in positions:
        data = bytearray(small_package)
        data[i] ^= 1 << rng.randrange(8)
        err = attempt(bytes(data))
        assert err is not None and err.check == "decrypt", i


def test_truncation_and_extension_at_every_section_boundary_is_rejected(
        small_package: bytes, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey) -> None:
    attempt = _opener(signer_a, recipient)
    cuts = {0, 1, 4}
    for start, end in _boundaries(small_package).values():
        cuts |= {start - 1, start, start + 1, end - 1, end + 1}
    cuts = {c for c in cuts if 0 <= c < len(small_package)}
    for cut in sorted(cuts):
        err = attempt(small_package[:cut])
        assert err is not None and err.check == "bounds", cut
    for extra in (b"\x00", b"x" * 100):
        err = attempt(small_package + extra)
        assert err is not None and err.check == "bounds"


@pytest.mark.parametrize("field_offset", [72, 76, 80, 88, 90])
def test_declared_lengths_far_beyond_the_file_are_rejected_without_allocating(
        small_package: bytes, signer_a, recipient, field_offset: int) -> None:
    attempt = _opener(signer_a, recipient)
    data = bytearray(small_package)
    fmt_char = {72: ">I", 76: ">I", 80: ">Q", 88: ">H", 90: ">H"}[field_offset]
    struct.pack_into(fmt_char, data, field_offset, 2 ** (8 * struct.calcsize(fmt_char)) - 1)
    huge = bytes(data)
    tracemalloc.start()
    try:
        err = attempt(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err is not None and err.check == "bounds"
    assert peak < 64 * 1024


def test_payload_length_within_limits_but_beyond_the_file_is_rejected(
        small_package: bytes, signer_a, recipient) -> None:
    data = bytearray(small_package)
    struct.pack_into(">Q", data, 80, 200 * 1024 * 1024)
    err = _opener(signer_a, recipient)(bytes(data))
    assert err is not None and err.check == "bounds" and "file has" in err.reason


def test_signed_manifest_over_the_limit_is_rejected_before_verifying(
        small_package: bytes, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey) -> None:
    opened = open_package(small_package, trusted_signers=[signer_a.public_key()], recipient_keys=[recipient])
    plaintext = payload.encode(opened.tensors)
    padded = opened.manifest.to_bytes() + b" " * (Limits().max_manifest_bytes + 1)
    err = _opener(signer_a, recipient)(seal(padded, plaintext, signer_a, recipient.public_key()))
    assert err is not None and err.check == "bounds"
    with pytest.raises(InvalidPackage) as exc:
        inspect(small_package, trusted_signers=[signer_a.public_key()], limits=Limits(max_manifest_bytes=100))
    assert exc.value.check == "bounds"


@pytest.mark.parametrize("alteration", ["low_order_ephemeral", "other_kem_ciphertext", "bad_wrap"])
def test_signed_but_broken_key_wrap_is_rejected_at_unwrap(
        small_package: bytes, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey,
        alteration: str) -> None:
    opened = _opened(small_package, signer_a, recipient)
    other_ct = fmt.parse(small_package, Limits()).wrapped_key[32:1120].tobytes()
    alter = {
        "low_order_ephemeral": lambda w: bytes(32) + w[32:],
        "other_kem_ciphertext": lambda w: w[:32] + other_ct + w[1120:],
        "bad_wrap": lambda w: w[:-1] + bytes([w[-1] ^ 1]),
    }[alteration]
    data = seal(opened.manifest.to_bytes(), payload.encode(opened.tensors), signer_a,
                recipient.public_key(), alter_wrapped_key=alter)
    err = _opener(signer_a, recipient)(data)
    assert err is not None and err.check == "unwrap", alteration


def _opened(small_package: bytes, signer: SigningPrivateKey, recipient: RecipientPrivateKey):
    return open_package(small_package, trusted_signers=[signer.public_key()], recipient_keys=[recipient])


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("damage", ["offsets_overlap", "hole", "extra_tensor", "wrong_dtype",
                                    "header_too_long", "not_json", "misaligned"])
def test_signed_payload_that_breaks_safetensors_rules_is_rejected(
        small_package: bytes, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey,
        damage: str) -> None:
    opened = _opened(small_package, signer_a, recipient)
    specs = opened.manifest.tensors
    header, blobs, offset = {}, [], 0
    for spec in specs:
        blob = opened.tensors[spec.name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    data = b"".join(blobs)
    first = specs[0].name
    if damage == "offsets_overlap":
        header[specs[1].name]["data_offsets"][0] -= 2
        header[specs[1].name]["data_offsets"][1] -= 2
    elif damage == "hole":
        data += b"\0\0"
    elif damage == "extra_tensor":
        header["extra.weight"] = {"dtype": "BF16", "shape": [1], "data_offsets": [offset, offset + 2]}
        data += b"\0\0"
    elif damage == "wrong_dtype":
        header[first]["dtype"] = "F16"
    elif damage == "misaligned":
        data = b"\0" + data
        for entry in header.values():
            entry["data_offsets"] = [entry["data_offsets"][0] + 1, entry["data_offsets"][1] + 1]
    plaintext = _safetensors(header, data)
    if damage == "header_too_long":
        plaintext = struct.pack("<Q", len(plaintext)) + plaintext[8:]
    elif damage == "not_json":
        plaintext = plaintext[:8] + b"\xff" + plaintext[9:]
    manifest = Manifest(**{**opened.manifest.__dict__, "payload_length": len(plaintext),
                           "payload_sha256": hashlib.sha256(plaintext).hexdigest()})
    err = _opener(signer_a, recipient)(seal(manifest.to_bytes(), plaintext, signer_a, recipient.public_key()))
    assert err is not None and err.check == "payload", damage


def test_correctly_sealed_reference_payload_built_by_hand_opens(
        small_package: bytes, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey) -> None:
    """The control for the test above: the same hand-built payload, undamaged, is accepted."""
    opened = _opened(small_package, signer_a, recipient)
    plaintext = payload.encode(opened.tensors)
    data = seal(opened.manifest.to_bytes(), plaintext, signer_a, recipient.public_key())
    assert _opener(signer_a, recipient)(data) is None


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 2**31), st.just(0)),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_random_mutations_only_ever_raise_invalid_package(
        small_package: bytes, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey,
        mutations: list) -> None:
    data = bytearray(small_package)
    for kind, position, arg in mutations:
        i = position % (len(data) + 1)
        if kind == "flip" and i < len(data):
            data[i] ^= arg
        elif kind == "insert":
            data[i:i] = arg
        elif kind == "delete":
            del data[i:i + arg]
        elif kind == "truncate":
            del data[i:]
    try:
        open_package(bytes(data), trusted_signers=[signer_a.public_key()],
                     recipient_keys=[recipient], verify_digest=True)
    except InvalidPackage as exc:
        assert str(exc) == "invalid package"
    else:
        assert bytes(data) == small_package
