"""Tenant operations shared by the admin API, the tenant self-service API and the bootstrap:
changes to tenants, API keys, signing keys and adapters are checked here and written to the
audit log here (expert tables and cache actions are audited by their handlers, through
``audit``).

Upload order: size limit -> open fully in memory (both signatures against the tenant's
active signing keys, key unwrap, decrypt, payload digest, tensors against the base model) ->
manifest tenant must be the caller -> quota -> blob written atomically -> registry record.
A failure at any step leaves nothing behind (the blob is removed if the record cannot be
written), and what a crash between two steps leaves is removed by ``sweep_blobs``, which the
gateway runs at start and then periodically. The plaintext is dropped; the blob is the package
as uploaded.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from adapters.base_model import BaseModelSpec
from adapters.errors import InvalidPackage, KeyFileError
from adapters.keys import SigningPublicKey
from adapters.package import open_package
from cache import AdapterCache

from .. import errors
from ..store import AdapterRecord, AlreadyExists, ApiKeyRecord, SigningKeyRecord, Store, Tenant
from .auth import Authenticator
from .blobs import BlobStore
from .keyprovider import KeyProvider
from .packages import signing_public
from .usage import UsageRecorder

TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
TENANT_SCOPES = ("tenant", "tenant-admin")
OPERATOR_SCOPES = ("admin", "metrics")  # metrics: read /metrics, nothing else


class Tenancy:
    def __init__(self, store: Store, auth: Authenticator, keys: KeyProvider, blobs: BlobStore,
                 cache: AdapterCache | None, base_model: BaseModelSpec | None, reserved_names: set[str],
                 on_change: Callable[[], None] = lambda: None, usage: UsageRecorder | None = None) -> None:
        self.store = store
        self.usage = usage
        self.changed = on_change  # after a change that remembered registry reads must not outlive
        self.auth = auth
        self.keys = keys
        self.blobs = blobs
        self.cache = cache
        self.base_model = base_model
        self.reserved = reserved_names

    async def audit(self, actor: str, action: str, target: str, **detail: Any) -> None:
        await self.store.append_audit(int(time.time()), actor, action, target,
                                      json.dumps(detail, sort_keys=True, separators=(",", ":")))

    # tenants -------------------------------------------------------------------------------
    async def create_tenant(self, actor: str, tenant_id: str, name: str, quotas: dict[str, Any]) -> Tenant:
        if not TENANT_ID.match(tenant_id):
            raise errors.InvalidRequest("Invalid 'id': lowercase letters, digits, '-' and '_', at most 63.",
                                        param="id", code="invalid_value")
        tenant = Tenant(tenant_id, name or tenant_id, int(time.time()), False, quotas, secrets.token_hex(8))
        try:
            await self.store.create_tenant(tenant)
        except AlreadyExists:
            raise errors.Conflict(f"Tenant '{tenant_id}' already exists.", code="tenant_exists") from None
        await self.audit(actor, "tenant.create", tenant_id, quotas=quotas)
        return tenant

    async def tenant(self, tenant_id: str) -> Tenant:
        tenant = await self.store.get_tenant(tenant_id)
        if tenant is None:
            raise errors.NotFound(f"No tenant '{tenant_id[:64]}'.", code="tenant_not_found")
        return tenant

    async def update_tenant(self, actor: str, tenant_id: str, *, name: str | None = None,
                            suspended: bool | None = None, quotas: dict[str, Any] | None = None) -> Tenant:
        tenant = await self.tenant(tenant_id)
        changes: dict[str, Any] = {}
        if name is not None:
            changes["name"] = name
        if suspended is not None:
            changes["suspended"] = suspended
        if quotas is not None:
            changes["quotas"] = quotas
        updated = dataclasses.replace(tenant, **changes)
        await self.store.update_tenant(updated)
        self.changed()  # suspension and quotas apply from the next request
        await self.audit(actor, "tenant.update", tenant_id, **changes)
        return updated

    async def delete_tenant(self, actor: str, tenant_id: str) -> None:
        await self.tenant(tenant_id)
        if self.usage is not None:
            self.usage.forget(tenant_id)  # what it has not written yet goes with it
        removed = await self.store.delete_tenant(tenant_id)
        self.changed()
        for record in removed:
            await self._forget(record)
        await self.audit(actor, "tenant.delete", tenant_id, adapters=[r.name for r in removed])

    # API keys --------------------------------------------------------------------------------
    async def issue_key(self, actor: str, tenant_id: str | None, scopes: tuple[str, ...], name: str,
                        key: str | None = None) -> tuple[str, ApiKeyRecord]:
        allowed = TENANT_SCOPES if tenant_id is not None else OPERATOR_SCOPES
        bad = [s for s in scopes if s not in allowed]
        if not scopes or bad:
            raise errors.InvalidRequest(f"Invalid 'scopes': choose from {', '.join(allowed)}.", param="scopes",
                                        code="invalid_value")
        if tenant_id is not None:
            await self.tenant(tenant_id)
        plaintext, record = await self.auth.issue(tenant_id, scopes, name, key)
        await self.audit(actor, "key.issue", record.id, tenant=tenant_id, scopes=list(scopes), name=name)
        return plaintext, record

    async def revoke_key(self, actor: str, key_id: str, tenant_id: str | None = None) -> ApiKeyRecord:
        record = await self.store.get_api_key(key_id)
        if record is None or (tenant_id is not None and record.tenant != tenant_id):
            raise errors.NotFound(f"No API key '{key_id[:64]}'.", code="key_not_found")
        record = await self.store.revoke_api_key(key_id, int(time.time()))
        assert record is not None
        self.changed()
        await self.audit(actor, "key.revoke", key_id, tenant=record.tenant)
        return record

    # signing keys ------------------------------------------------------------------------------
    async def register_signing_key(self, actor: str, tenant_id: str, pems: Any) -> SigningKeyRecord:
        await self.tenant(tenant_id)
        if not isinstance(pems, dict) or not all(isinstance(pems.get(k), str) for k in ("ed25519_pem", "mldsa_pem")):
            raise errors.InvalidRequest("Send the public key as {\"ed25519_pem\": ..., \"mldsa_pem\": ...}.",
                                        param="ed25519_pem", code="invalid_value")
        try:
            public = SigningPublicKey.from_pems(pems["ed25519_pem"].encode(), pems["mldsa_pem"].encode())
        except (KeyFileError, ValueError):
            raise errors.InvalidRequest("The PEMs are not an Ed25519 and an ML-DSA-65 public key.",
                                        param="ed25519_pem", code="invalid_key") from None
        document = json.dumps({k: v.decode() for k, v in public.to_pems().items()})
        record = SigningKeyRecord(public.key_id, tenant_id, document, int(time.time()))
        try:
            await self.store.add_signing_key(record)
        except AlreadyExists:
            raise errors.Conflict("This signing key is already registered.", code="key_exists") from None
        await self.audit(actor, "signing_key.register", public.key_id, tenant=tenant_id)
        return record

    async def revoke_signing_key(self, actor: str, tenant_id: str, key_id: str) -> SigningKeyRecord:
        record = await self.store.revoke_signing_key(tenant_id, key_id, int(time.time()))
        if record is None:
            raise errors.NotFound(f"No signing key '{key_id[:64]}'.", code="key_not_found")
        await self.audit(actor, "signing_key.revoke", key_id, tenant=tenant_id)
        return record

    # adapters ---------------------------------------------------------------------------------
    async def upload(self, actor: str, tenant_id: str, data: bytes) -> AdapterRecord:
        tenant = await self.tenant(tenant_id)
        if self.base_model is None:
            raise errors.Overloaded("Adapter uploads need the base model's description; the backend has none.",
                                    code="uploads_unavailable")
        signers = [signing_public(r) for r in await self.store.list_signing_keys(tenant_id)]
        recipients = [k.private for k in self.keys.recipient_keys()]
        try:
            opened = await asyncio.to_thread(open_package, data, trusted_signers=signers,
                                             recipient_keys=recipients, base_model=self.base_model,
                                             verify_digest=True)
        except InvalidPackage:
            raise errors.InvalidRequest(
                "The package could not be verified: it must be signed by one of your registered signing keys, "
                "wrapped to a current recipient key of this gateway (GET /v1/tssp/recipient), and built for "
                f"base model '{self.base_model.model_id}'.", code="invalid_package") from None
        m = opened.manifest
        del opened  # the plaintext goes no further
        if m.tenant != tenant_id:
            raise errors.PermissionDenied("The package was made for another tenant.", code="tenant_mismatch")
        if m.name in self.reserved:
            raise errors.Conflict(f"'{m.name}' is a reserved model name.", code="adapter_exists")
        limit = tenant.quotas.get("max_adapters")
        if limit is not None and await self.store.count_adapters(tenant_id) >= limit:
            raise errors.RateLimited(f"Adapter limit of {limit} reached; delete one first.", code="quota_exceeded")
        blob = await asyncio.to_thread(self.blobs.put, data)
        record = AdapterRecord(tenant_id, m.name, m.version, blob, len(data), hashlib.sha256(data).hexdigest(),
                               m.base_model, m.rank, float(m.alpha), tuple(m.target_modules), m.signer_key_id,
                               int(time.time()))
        try:
            await self.store.add_adapter(record)
        except AlreadyExists:
            self.blobs.delete(blob)
            raise errors.Conflict(f"An adapter named '{m.name}' exists; delete it first to replace it.",
                                  code="adapter_exists") from None
        except BaseException:
            self.blobs.delete(blob)
            raise
        await self.audit(actor, "adapter.upload", f"{tenant_id}/{m.name}", version=m.version, sha256=record.sha256,
                         signer=m.signer_key_id)
        return record

    async def adapter(self, tenant_id: str, name: str) -> AdapterRecord:
        record = await self.store.get_adapter(tenant_id, name)
        if record is None:
            raise errors.NotFound(f"No adapter '{name[:64]}'.", code="adapter_not_found")
        return record

    async def delete_adapter(self, actor: str, tenant_id: str, name: str) -> AdapterRecord:
        record = await self.store.delete_adapter(tenant_id, name)
        if record is None:
            raise errors.NotFound(f"No adapter '{name[:64]}'.", code="adapter_not_found")
        self.changed()
        await self._forget(record)
        await self.audit(actor, "adapter.delete", f"{tenant_id}/{name}", version=record.version)
        return record

    async def sweep_blobs(self, grace_s: float) -> list[str]:
        """Remove what a crash left in the blob store (temp files, blobs no record names) once
        older than ``grace_s``; returns the names removed."""
        candidates = await asyncio.to_thread(self.blobs.candidates, grace_s)  # before the records
        if not candidates:
            return []
        referenced: set[str] = set()
        after = None
        while batch := await self.store.list_adapters(None, 1000, after):
            referenced.update(r.blob for r in batch)
            after = f"{batch[-1].tenant}/{batch[-1].name}"
        return await asyncio.to_thread(self.blobs.sweep, candidates, referenced)

    async def _forget(self, record: AdapterRecord) -> None:
        if self.cache is not None:
            await self.cache.remove(record.key)
        self.blobs.delete(record.blob)
