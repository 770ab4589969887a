"""Round trips, key rotation, and who may open what."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from adapters import format as fmt
from adapters import payload
from adapters.errors import InvalidAdapter, InvalidPackage
from adapters.limits import Limits
from adapters.keys import RecipientPrivateKey, SigningPrivateKey, generate_signing_key
from adapters.manifest import Manifest
from adapters.package import inspect, open_package, pack, read_unverified_manifest
from adapters.lora import LoraConfig
from adapters.peft import read_peft_dir
from adapters.signatures import sign

from .builders import (ALL_MODULES, SMOLLM2, SMOLLM2_2L, bits, lora_tensors, peft_config, seal,
                       write_peft_dir)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_of_full_smollm2_adapter_is_bit_exact(
        tmp_path: Path, dtype: torch.dtype, signer_a: SigningPrivateKey,
        recipient: RecipientPrivateKey) -> None:
    originals = lora_tensors(SMOLLM2, 8, ALL_MODULES, dtype, seed=1)
    peft_dir = write_peft_dir(tmp_path / "a", peft_config(8, ALL_MODULES, alpha=16), originals)
    data = pack(peft_dir, tenant="tenant-a", name="full", version="2", base_model=SMOLLM2.model_id,
                signer=signer_a, recipient=recipient.public_key(), base_spec=SMOLLM2)
    opened = open_package(data, trusted_signers=[signer_a.public_key()], recipient_keys=[recipient],
                          base_model=SMOLLM2, verify_digest=True)
    assert opened.digest_verified
    assert sorted(opened.tensors) == sorted(originals)
    for name, tensor in originals.items():
        assert opened.tensors[name].dtype == dtype
        assert torch.equal(bits(opened.tensors[name]), bits(tensor)), name


def test_manifest_describes_the_adapter(small_package: bytes, small_dir: Path,
                                        signer_a: SigningPrivateKey,
                                        recipient: RecipientPrivateKey) -> None:
    m = inspect(small_package, trusted_signers=[signer_a.public_key()])
    assert (m.tenant, m.name, m.version, m.base_model) == ("tenant-a", "support-bot", "1.0.0", SMOLLM2_2L.model_id)
    assert (m.rank, m.alpha, m.use_rslora, m.target_modules) == (4, 8, False, ("q_proj", "v_proj"))
    assert (m.signer_key_id, m.recipient_key_id) == (signer_a.key_id, recipient.key_id)
    assert m.created == 1_700_000_000 and len(m.tensors) == 8
    assert m.tensors[0].dtype == "BF16" and m.tensors[0].shape in {(4, 576), (576, 4), (192, 4)}
    opened = open_package(small_package, trusted_signers=[signer_a.public_key()],
                          recipient_keys=[recipient], verify_digest=True)
    assert opened.manifest == m and m.to_dict()["tensors"][0]["shape"] == list(m.tensors[0].shape)
    sections = fmt.parse(small_package, Limits())
    assert m.payload_length == sections.header.payload_length
    _, tensors = read_peft_dir(small_dir)
    assert all(torch.equal(bits(opened.tensors[k]), bits(v)) for k, v in tensors.items())


def test_tensors_can_be_packed_from_memory(signer_a: SigningPrivateKey, recipient: RecipientPrivateKey) -> None:
    tensors = lora_tensors(SMOLLM2_2L, 2, ("o_proj",), torch.float32)
    data = pack((LoraConfig(2, 4.5, ("o_proj",), use_rslora=True), tensors), tenant="t",
                name="n", version="v1", base_model=SMOLLM2_2L.model_id, signer=signer_a,
                recipient=recipient.public_key())
    opened = open_package(data, trusted_signers=[signer_a.public_key()], recipient_keys=[recipient],
                          base_model=SMOLLM2_2L)
    assert opened.manifest.use_rslora and opened.manifest.alpha == 4.5
    assert all(torch.equal(opened.tensors[k], v) for k, v in tensors.items())


def test_gateway_opens_packages_wrapped_to_any_of_its_recipient_keys(
        small_dir: Path, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey,
        other_recipient: RecipientPrivateKey) -> None:
    for target in (recipient, other_recipient):
        data = pack(small_dir, tenant="tenant-a", name="n", version="1", base_model="m",
                    signer=signer_a, recipient=target.public_key())
        opened = open_package(data, trusted_signers=[signer_a.public_key()],
                              recipient_keys=[other_recipient, recipient])
        assert opened.manifest.recipient_key_id == target.key_id


def test_any_registered_signing_key_of_the_tenant_verifies(
        small_dir: Path, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey) -> None:
    rotated = generate_signing_key()
    data = pack(small_dir, tenant="tenant-a", name="n", version="1", base_model="m",
                signer=rotated, recipient=recipient.public_key())
    trusted = [signer_a.public_key(), rotated.public_key()]
    assert inspect(data, trusted_signers=trusted).signer_key_id == rotated.key_id


def test_wrong_recipient_key_is_rejected(small_package: bytes, signer_a: SigningPrivateKey,
                                         other_recipient: RecipientPrivateKey) -> None:
    with pytest.raises(InvalidPackage) as err:
        open_package(small_package, trusted_signers=[signer_a.public_key()], recipient_keys=[other_recipient])
    assert err.value.check == "recipient"


def test_recipient_key_with_forged_matching_id_cannot_unwrap(
        small_package: bytes, signer_a: SigningPrivateKey, other_recipient: RecipientPrivateKey,
        recipient: RecipientPrivateKey) -> None:
    """Selection by id is only a lookup: the unwrap itself proves the key."""
    class Impostor(RecipientPrivateKey):
        key_id = recipient.key_id  # type: ignore[assignment]
    impostor = Impostor(other_recipient.x25519, other_recipient.mlkem768)
    with pytest.raises(InvalidPackage) as err:
        open_package(small_package, trusted_signers=[signer_a.public_key()], recipient_keys=[impostor])
    assert err.value.check == "unwrap"


def test_untrusted_signer_is_rejected(small_package: bytes, signer_b: SigningPrivateKey,
                                      recipient: RecipientPrivateKey) -> None:
    with pytest.raises(InvalidPackage) as err:
        open_package(small_package, trusted_signers=[signer_b.public_key()], recipient_keys=[recipient])
    assert err.value.check == "signature"
    with pytest.raises(InvalidPackage):
        inspect(small_package, trusted_signers=[])


def _resign(data: bytes, signer: SigningPrivateKey, manifest: Manifest) -> bytes:
    """What tenant B can do with tenant A's package: new manifest and header, own signatures."""
    s = fmt.parse(data, Limits())
    manifest_bytes = manifest.to_bytes()
    header = fmt.Header(signer_key_id=bytes.fromhex(signer.key_id),
                        recipient_key_id=s.header.recipient_key_id,
                        manifest_length=len(manifest_bytes), payload_length=s.header.payload_length)
    message = fmt.signed_message(header.encode(), manifest_bytes, bytes(s.wrapped_key),
                                 bytes(s.nonce), bytes(s.tag))
    ed, ml = sign(signer, message)
    return fmt.assemble(header, manifest_bytes, bytes(s.wrapped_key), bytes(s.nonce),
                        bytes(s.ciphertext_and_tag), ed, ml)


def test_package_resigned_by_another_tenant_is_rejected(
        small_package: bytes, signer_a: SigningPrivateKey, signer_b: SigningPrivateKey,
        recipient: RecipientPrivateKey) -> None:
    original = inspect(small_package, trusted_signers=[signer_a.public_key()])
    stolen = Manifest(**{**original.__dict__, "tenant": "tenant-b", "signer_key_id": signer_b.key_id})
    forged = _resign(small_package, signer_b, stolen)
    # A's key only: B's signatures do not count.
    with pytest.raises(InvalidPackage) as err:
        open_package(forged, trusted_signers=[signer_a.public_key()], recipient_keys=[recipient])
    assert err.value.check == "signature"
    # Even where B is trusted (B uploading as itself), the payload is bound to A's header and
    # manifest as AES-GCM associated data: decryption fails, so B cannot claim A's adapter.
    assert inspect(forged, trusted_signers=[signer_b.public_key()]).tenant == "tenant-b"
    with pytest.raises(InvalidPackage) as err:
        open_package(forged, trusted_signers=[signer_b.public_key()], recipient_keys=[recipient])
    assert err.value.check == "decrypt"
    # Keeping A's manifest (tenant-a) but signing with B: the manifest names A's key.
    kept = _resign(small_package, signer_b, original)
    with pytest.raises(InvalidPackage) as err:
        open_package(kept, trusted_signers=[signer_b.public_key()], recipient_keys=[recipient])
    assert err.value.check == "manifest"


def test_tenant_in_manifest_is_covered_by_the_signature(small_package: bytes,
                                                        signer_a: SigningPrivateKey) -> None:
    s = fmt.parse(small_package, Limits())
    start = fmt.HEADER_LENGTH + bytes(s.manifest).index(b'"tenant":"tenant-a"') + len('"tenant":"tenant-')
    forged = bytearray(small_package)
    forged[start] = ord("b")
    assert b'"tenant":"tenant-b"' in forged
    with pytest.raises(InvalidPackage) as err:
        inspect(bytes(forged), trusted_signers=[signer_a.public_key()])
    assert err.value.check == "signature"


def test_base_model_mismatch_is_rejected(small_package: bytes, signer_a: SigningPrivateKey,
                                         recipient: RecipientPrivateKey) -> None:
    with pytest.raises(InvalidPackage) as err:
        open_package(small_package, trusted_signers=[signer_a.public_key()],
                     recipient_keys=[recipient], base_model=SMOLLM2)
    assert err.value.check == "adapter"


def test_unverified_manifest_is_readable_without_keys(small_package: bytes) -> None:
    assert read_unverified_manifest(small_package).name == "support-bot"


def test_manifest_encoding_is_canonical(small_package: bytes) -> None:
    raw = bytes(fmt.parse(small_package, Limits()).manifest)
    data = json.loads(raw)
    assert raw == json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    assert len(data["payload_sha256"]) == 64
    spaced = json.dumps(data, sort_keys=True).encode()
    with pytest.raises(InvalidAdapter, match="canonical"):
        Manifest.from_bytes(spaced)
    duplicated = raw[:-1] + b',"tenant":"x"}'
    with pytest.raises(InvalidAdapter):
        Manifest.from_bytes(duplicated)


def test_digest_check_catches_a_payload_that_differs_from_the_manifest(
        small_package: bytes, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey) -> None:
    """A packer that records a wrong digest: the tag still authenticates the ciphertext, so
    only the upload-time digest check (verify_digest=True) notices."""
    opened = open_package(small_package, trusted_signers=[signer_a.public_key()], recipient_keys=[recipient])
    manifest = opened.manifest
    plaintext = payload.encode(opened.tensors)
    assert hashlib.sha256(plaintext).hexdigest() == manifest.payload_sha256
    wrong = Manifest(**{**manifest.__dict__, "payload_sha256": hashlib.sha256(b"other").hexdigest()})
    data = seal(wrong.to_bytes(), plaintext, signer_a, recipient.public_key())
    kwargs = dict(trusted_signers=[signer_a.public_key()], recipient_keys=[recipient])
    assert not open_package(data, **kwargs).digest_verified
    with pytest.raises(InvalidPackage) as err:
        open_package(data, verify_digest=True, **kwargs)
    assert err.value.check == "digest"


def test_pack_refuses_invalid_labels(small_dir: Path, signer_a: SigningPrivateKey,
                                     recipient: RecipientPrivateKey) -> None:
    with pytest.raises(InvalidAdapter, match="tenant 'a b'"):
        pack(small_dir, tenant="a b", name="n", version="1", base_model="m", signer=signer_a,
             recipient=recipient.public_key())


def test_pack_refuses_adapter_that_does_not_fit_the_base(
        tmp_path: Path, signer_a: SigningPrivateKey, recipient: RecipientPrivateKey) -> None:
    peft_dir = write_peft_dir(tmp_path / "a", peft_config(4, ("q_proj",)), lora_tensors(SMOLLM2_2L, 4, ("q_proj",)))
    with pytest.raises(InvalidAdapter, match="missing tensor"):
        pack(peft_dir, tenant="t", name="n", version="1", base_model=SMOLLM2.model_id,
             signer=signer_a, recipient=recipient.public_key(), base_spec=SMOLLM2)


def test_fresh_data_key_and_nonce_per_package(small_dir: Path, signer_a: SigningPrivateKey,
                                              recipient: RecipientPrivateKey) -> None:
    kwargs = dict(tenant="t", name="n", version="1", base_model="m", signer=signer_a,
                  recipient=recipient.public_key(), created=5)
    one, two = pack(small_dir, **kwargs), pack(small_dir, **kwargs)
    limits = Limits()
    a, b = fmt.parse(one, limits), fmt.parse(two, limits)
    assert bytes(a.manifest) == bytes(b.manifest)
    assert bytes(a.wrapped_key) != bytes(b.wrapped_key) and bytes(a.nonce) != bytes(b.nonce)
    assert bytes(a.ciphertext_and_tag) != bytes(b.ciphertext_and_tag)


def test_manifest_refuses_unknown_fields_and_wrong_types(small_package: bytes) -> None:
    raw = bytes(fmt.parse(small_package, Limits()).manifest)
    data = json.loads(raw)
    for bad in ({**data, "extra": 1}, {**data, "rank": True}, {**data, "rank": 4.0},
                {**data, "tensors": []}, {**data, "target_modules": ["v_proj", "q_proj"]}):
        with pytest.raises(InvalidAdapter):
            Manifest.from_bytes(json.dumps(bad, sort_keys=True, separators=(",", ":")).encode())


def test_limits_must_be_positive_integers() -> None:
    with pytest.raises(ValueError, match="max_rank"):
        Limits(max_rank=0)
