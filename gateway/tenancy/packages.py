"""The disk tier's view of the registry: an adapter key -> its stored package and the signing
keys of its tenant."""
from __future__ import annotations

import json

from adapters.keys import SigningPublicKey
from cache import UnknownAdapter
from cache.tssp import PackageRef

from ..store import Store
from ..store.types import SigningKeyRecord
from .blobs import BlobStore


def signing_public(record: SigningKeyRecord) -> SigningPublicKey:
    pems = json.loads(record.public)
    return SigningPublicKey.from_pems(pems["ed25519_pem"].encode(), pems["mldsa_pem"].encode())


def split_key(key: str) -> tuple[str, str, str]:
    """``tenant/name@version`` -> parts."""
    tenant, _, rest = key.partition("/")
    name, _, version = rest.rpartition("@")
    return tenant, name, version


class StoredPackages:
    """The disk tier's lookup: adapter key -> stored package and its tenant's signing keys.
    Keys revoked after an upload still verify packages they signed before (revocation stops
    new uploads; an operator deletes adapters that must go)."""

    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self.store = store
        self.blobs = blobs

    async def __call__(self, key: str) -> PackageRef:
        tenant, name, version = split_key(key)
        record = await self.store.get_adapter(tenant, name)
        if record is None or record.version != version:
            raise UnknownAdapter(key)
        signers = await self.store.list_signing_keys(tenant, include_revoked=True)
        return PackageRef(tenant, self.blobs.path(record.blob), tuple(signing_public(s) for s in signers))
