from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from adapters.errors import KeyFileError
from adapters.keys import (
    RecipientPrivateKey,
    RecipientPublicKey,
    SigningPrivateKey,
    SigningPublicKey,
    current_recipient_from_document,
    generate_recipient_key,
    generate_signing_key,
    load_recipient_private,
    load_recipient_public,
    load_signing_private,
    load_signing_public,
    recipient_key_entry,
    save_recipient_key,
    save_signing_key,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_key_files_are_created_0600_and_public_0644(tmp_path: Path) -> None:
    save_signing_key(tmp_path / "s", generate_signing_key())
    save_recipient_key(tmp_path / "r", generate_recipient_key())
    for name in ("s/ed25519_private.pem", "s/mldsa65_private.pem", "r/x25519_private.pem",
                 "r/mlkem768_private.pem"):
        assert _mode(tmp_path / name) == 0o600, name
    for name in ("s/ed25519_public.pem", "s/mldsa65_public.pem", "r/x25519_public.pem",
                 "r/mlkem768_public.pem"):
        assert _mode(tmp_path / name) == 0o644, name


def test_signing_key_round_trips_through_its_directory(tmp_path: Path) -> None:
    key = generate_signing_key()
    save_signing_key(tmp_path, key)
    private, public = load_signing_private(tmp_path), load_signing_public(tmp_path)
    assert private.key_id == public.key_id == key.key_id
    assert private.to_bytes() == key.to_bytes()
    assert (tmp_path / "key_id").read_text().strip() == key.key_id


def test_recipient_key_round_trips_through_its_directory(tmp_path: Path) -> None:
    key = generate_recipient_key()
    save_recipient_key(tmp_path, key)
    assert load_recipient_private(tmp_path).to_bytes() == key.to_bytes()
    assert load_recipient_public(tmp_path) == key.public_key()


def test_key_id_is_sha256_of_raw_public_keys_in_documented_order() -> None:
    s, r = generate_signing_key(), generate_recipient_key()
    assert s.key_id == hashlib.sha256(s.ed25519.public_key().public_bytes_raw()
                                      + s.mldsa65.public_key().public_bytes_raw()).hexdigest()
    assert r.key_id == hashlib.sha256(r.x25519.public_key().public_bytes_raw()
                                      + r.mlkem768.public_key().public_bytes_raw()).hexdigest()
    assert s.key_id == SigningPrivateKey.from_bytes(s.to_bytes()).key_id  # stable across reloads


def test_private_keys_round_trip_through_bytes() -> None:
    s, r = generate_signing_key(), generate_recipient_key()
    assert SigningPrivateKey.from_bytes(s.to_bytes()).to_bytes() == s.to_bytes()
    assert RecipientPrivateKey.from_bytes(r.to_bytes()).to_bytes() == r.to_bytes()
    assert s.to_bytes().count(b"BEGIN PRIVATE KEY") == 2


def test_public_keys_round_trip_through_pems() -> None:
    s, r = generate_signing_key().public_key(), generate_recipient_key().public_key()
    assert set(s.to_pems()) == {"ed25519_pem", "mldsa_pem"}
    assert set(r.to_pems()) == {"x25519_pem", "mlkem768_pem"}
    assert SigningPublicKey.from_pems(**s.to_pems()) == s
    assert RecipientPublicKey.from_pems(**r.to_pems()) == r


def test_saving_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    first = generate_signing_key()
    save_signing_key(tmp_path, first)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        save_signing_key(tmp_path, generate_signing_key())
    assert load_signing_private(tmp_path).key_id == first.key_id


@pytest.mark.parametrize("damage", ["garbage_body", "truncated", "empty"])
def test_damaged_pem_is_a_key_file_error(tmp_path: Path, damage: str) -> None:
    save_signing_key(tmp_path, generate_signing_key())
    path = tmp_path / "mldsa65_private.pem"
    pem = path.read_bytes()
    path.write_bytes({"garbage_body": pem.replace(pem.splitlines()[1], b"A" * 20),
                      "truncated": pem[: len(pem) // 2], "empty": b""}[damage])
    with pytest.raises(KeyFileError, match="mldsa|ML-DSA|PEM"):
        load_signing_private(tmp_path)


def test_edited_public_key_file_is_detected_by_recorded_key_id(tmp_path: Path) -> None:
    save_signing_key(tmp_path, generate_signing_key())
    path = tmp_path / "ed25519_public.pem"
    lines = path.read_bytes().splitlines(keepends=True)
    body = bytearray(lines[1])
    body[-6] = ord("A") if body[-6] != ord("A") else ord("B")  # still valid base64 and a valid key
    path.write_bytes(lines[0] + bytes(body) + b"".join(lines[2:]))
    with pytest.raises(KeyFileError, match="does not match"):
        load_signing_public(tmp_path)


def test_public_file_swapped_for_another_key_is_detected(tmp_path: Path) -> None:
    save_recipient_key(tmp_path / "one", generate_recipient_key())
    save_recipient_key(tmp_path / "two", generate_recipient_key())
    (tmp_path / "one" / "mlkem768_public.pem").write_bytes(
        (tmp_path / "two" / "mlkem768_public.pem").read_bytes())
    with pytest.raises(KeyFileError, match="does not match the private key"):
        load_recipient_private(tmp_path / "one")


def test_pem_of_the_wrong_algorithm_is_refused(tmp_path: Path) -> None:
    save_signing_key(tmp_path, generate_signing_key())
    ed = (tmp_path / "ed25519_public.pem").read_bytes()
    with pytest.raises(KeyFileError, match="ML-DSA-65"):
        SigningPublicKey.from_pems(ed, ed)


def test_missing_key_file_names_the_file(tmp_path: Path) -> None:
    save_signing_key(tmp_path, generate_signing_key())
    (tmp_path / "mldsa65_public.pem").unlink()
    with pytest.raises(KeyFileError, match="mldsa65_public.pem: missing key file"):
        load_signing_public(tmp_path)


def test_recipient_document_yields_the_current_key() -> None:
    old, new = generate_recipient_key().public_key(), generate_recipient_key().public_key()
    doc = {"data": [recipient_key_entry(old, created=1, current=False),
                    recipient_key_entry(new, created=2, current=True)]}
    assert current_recipient_from_document(doc) == new


def test_recipient_document_with_wrong_key_id_or_no_current_key_is_refused() -> None:
    key = generate_recipient_key().public_key()
    entry = recipient_key_entry(key, created=1, current=True)
    with pytest.raises(KeyFileError, match="does not match"):
        current_recipient_from_document({"data": [{**entry, "key_id": "0" * 64}]})
    with pytest.raises(KeyFileError, match="exactly one"):
        current_recipient_from_document({"data": [{**entry, "current": False}]})
    with pytest.raises(KeyFileError, match='"data" list'):
        current_recipient_from_document([entry])
