"""Packing and opening TSSP packages (SPEC.md §7 gives the order of checks, §5 the reasons).

``open_package`` checks in this order, and stops at the first failure with one opaque
``InvalidPackage`` (the reason is logged, never shown): bounds of every section -> both
signatures under a trusted key with the header's signer id -> manifest (canonical, consistent
with the header, within limits) -> LoRA structure and base-model shapes of the manifest's
tensor list -> key unwrap with the recipient key the header names -> AES-256-GCM decryption
(header and manifest are the associated data) -> plaintext SHA-256 if asked -> safetensors
parse, whose tensors must be exactly the manifest's list. Shapes are validated on the signed
list rather than on the tensors so that a wrong adapter is refused before paying for the
decryption; the parse then proves the tensors are that list. Nothing is parsed before it is
authenticated except the fixed-size header, and nothing is allocated from a declared length
before it is bounded.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import format as fmt
from . import payload
from .base_model import BaseModelSpec
from .errors import InvalidAdapter, InvalidPackage
from .hybrid_kem import DATA_KEY_LENGTH, unwrap_data_key, wrap_data_key
from .keypairs import RecipientPrivateKey, RecipientPublicKey, SigningPrivateKey, SigningPublicKey
from .limits import Limits
from .manifest import Manifest, check_labels
from .lora import LoraConfig
from .peft import read_peft_dir
from .signatures import find_verifying_signer, sign
from .validate import validate_adapter, validate_specs

__all__ = ["pack", "open_package", "inspect", "read_unverified_manifest", "OpenedPackage",
           "Manifest", "Limits"]

# A PEFT ``save_pretrained`` directory, or its contents already in memory.
AdapterSource = str | os.PathLike[str] | tuple[LoraConfig, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class OpenedPackage:
    """A verified, decrypted, validated package. ``tensors`` live in memory only."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    digest_verified: bool


def pack(source: AdapterSource, *, tenant: str, name: str, version: str, base_model: str,
         signer: SigningPrivateKey, recipient: RecipientPublicKey, created: int | None = None,
         base_spec: BaseModelSpec | None = None, limits: Limits = Limits()) -> bytes:
    """Validate an adapter (a PEFT directory, or ``(config, tensors)``) and seal it.

    Raises ``InvalidAdapter`` naming the problem. ``base_spec`` additionally checks shapes
    against the base model (the gateway does this on upload in any case).
    """
    if isinstance(source, tuple):
        config, tensors = source
    else:
        config, tensors = read_peft_dir(source, limits)
    check_labels(tenant, name, version, base_model)
    if base_spec is not None and base_spec.model_id != base_model:
        raise InvalidAdapter(
            f"base model {base_model!r} differs from the spec's {base_spec.model_id!r}")
    validate_adapter(config, tensors, base_spec, limits)
    plaintext = payload.encode(tensors)
    if len(plaintext) > limits.max_payload_bytes:
        raise InvalidAdapter(f"payload of {len(plaintext)} bytes exceeds max_payload_bytes "
                             f"{limits.max_payload_bytes}")
    manifest = Manifest(
        tenant=tenant, name=name, version=version, base_model=base_model, rank=config.rank,
        alpha=config.alpha, use_rslora=config.use_rslora,
        target_modules=config.target_modules, tensors=payload.describe(tensors),
        payload_length=len(plaintext), payload_sha256=hashlib.sha256(plaintext).hexdigest(),
        created=int(time.time()) if created is None else created,
        signer_key_id=signer.key_id, recipient_key_id=recipient.key_id)
    manifest_bytes = manifest.to_bytes()
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise InvalidAdapter(f"manifest of {len(manifest_bytes)} bytes exceeds "
                             f"max_manifest_bytes {limits.max_manifest_bytes}")
    header = fmt.Header(signer_key_id=bytes.fromhex(signer.key_id),
                        recipient_key_id=bytes.fromhex(recipient.key_id),
                        manifest_length=len(manifest_bytes), payload_length=len(plaintext))
    header_bytes = header.encode()
    data_key = os.urandom(DATA_KEY_LENGTH)
    wrapped = wrap_data_key(data_key, recipient)
    nonce = os.urandom(fmt.NONCE_LENGTH)
    sealed = AESGCM(data_key).encrypt(nonce, plaintext, header_bytes + manifest_bytes)
    tag = sealed[-fmt.TAG_LENGTH:]
    message = fmt.signed_message(header_bytes, manifest_bytes, wrapped, nonce, tag)
    ed_sig, ml_sig = sign(signer, message)
    return fmt.assemble(header, manifest_bytes, wrapped, nonce, sealed, ed_sig, ml_sig)


def _authenticate(data: bytes, trusted_signers: Sequence[SigningPublicKey],
                  limits: Limits) -> tuple[fmt.Sections, Manifest]:
    """Bounds, both signatures, then the manifest and its agreement with the header."""
    sections = fmt.parse(data, limits)
    header = sections.header
    signer = find_verifying_signer(header.signer_key_id.hex(), trusted_signers,
                                   sections.signed_message(), sections.ed25519_sig,
                                   sections.mldsa65_sig)
    if signer is None:
        raise InvalidPackage("signature", "no trusted signing key with the package's key id "
                             "verifies both signatures")
    try:
        manifest = Manifest.from_bytes(sections.manifest)
    except InvalidAdapter as exc:
        raise InvalidPackage("manifest", f"manifest rejected: {exc.problem}") from None
    if (manifest.signer_key_id != signer.key_id
            or manifest.recipient_key_id != header.recipient_key_id.hex()
            or manifest.payload_length != header.payload_length):
        raise InvalidPackage("manifest",
                             "manifest disagrees with the header (key ids or payload length)")
    if manifest.rank > limits.max_rank or len(manifest.tensors) > limits.max_tensors:
        raise InvalidPackage("manifest", f"manifest exceeds limits (rank {manifest.rank}, "
                             f"{len(manifest.tensors)} tensors)")
    return sections, manifest


def inspect(data: bytes, *, trusted_signers: Sequence[SigningPublicKey],
            limits: Limits = Limits()) -> Manifest:
    """The manifest of a package whose signatures verify; nothing is decrypted."""
    return _authenticate(data, trusted_signers, limits)[1]


def read_unverified_manifest(data: bytes, limits: Limits = Limits()) -> Manifest:
    """The manifest WITHOUT checking signatures: for display only, never for decisions."""
    sections = fmt.parse(data, limits)
    try:
        return Manifest.from_bytes(sections.manifest)
    except InvalidAdapter as exc:
        raise InvalidPackage("manifest", f"manifest rejected: {exc.problem}") from None


def _decrypt(sections: fmt.Sections, data_key: bytes) -> torch.Tensor:
    plaintext = payload.allocate(sections.header.payload_length)
    try:
        AESGCM(data_key).decrypt_into(bytes(sections.nonce), sections.ciphertext_and_tag,
                                      sections.header_and_manifest, plaintext.numpy())
    except InvalidTag:
        raise InvalidPackage(
            "decrypt", "payload decryption failed (altered ciphertext or associated data)"
        ) from None
    return plaintext


def _check_manifest_adapter(manifest: Manifest, base_model: BaseModelSpec | None,
                            limits: Limits) -> None:
    """LoRA structure (and base-model shapes) of the signed tensor list, before decrypting."""
    if base_model is not None and manifest.base_model != base_model.model_id:
        raise InvalidPackage("adapter", f"package is for base model {manifest.base_model!r}, "
                             f"not {base_model.model_id!r}")
    config = manifest.lora()
    try:
        validate_specs(config, manifest.tensors, base_model, limits)
    except InvalidAdapter as exc:
        raise InvalidPackage("adapter", f"adapter rejected: {exc.problem}") from None


def open_package(data: bytes, *, trusted_signers: Sequence[SigningPublicKey],
                 recipient_keys: Sequence[RecipientPrivateKey],
                 base_model: BaseModelSpec | None = None, verify_digest: bool = False,
                 limits: Limits = Limits()) -> OpenedPackage:
    """Verify, decrypt and validate a package. Any failure: ``InvalidPackage``."""
    sections, manifest = _authenticate(data, trusted_signers, limits)
    _check_manifest_adapter(manifest, base_model, limits)
    recipient = next((k for k in recipient_keys if k.key_id == manifest.recipient_key_id), None)
    if recipient is None:
        raise InvalidPackage("recipient", "no recipient key with the package's recipient key id")
    data_key = unwrap_data_key(sections.wrapped_key, recipient)
    plaintext = _decrypt(sections, data_key)
    if verify_digest and hashlib.sha256(plaintext.numpy()).hexdigest() != manifest.payload_sha256:
        raise InvalidPackage("digest", "plaintext SHA-256 differs from the manifest")
    tensors = payload.decode(plaintext, {spec.name: spec for spec in manifest.tensors}, limits)
    return OpenedPackage(manifest, tensors, verify_digest)
