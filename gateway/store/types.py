"""Records the registry keeps. Plain frozen data; times are Unix seconds (int)."""
from __future__ import annotations

import dataclasses
from typing import Any

SCOPES = ("tenant", "tenant-admin", "admin", "metrics")


@dataclasses.dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    created: int
    suspended: bool = False
    quotas: dict[str, Any] = dataclasses.field(default_factory=dict)  # QuotaLimits.to_dict()
    #: random, fixed at creation: tells a tenant from an earlier one with the same id, so what
    #: the earlier one left in flight (usage not yet written) never lands on the new one
    incarnation: str = ""


@dataclasses.dataclass(frozen=True)
class ApiKeyRecord:
    id: str  # public id, e.g. "key_3f2a..."
    tenant: str | None  # None for operator (admin) keys
    prefix: str  # the first characters of the key, shown to identify it
    digest: str  # hex HMAC-SHA256 of the key under the gateway's hashing key
    scopes: tuple[str, ...]
    name: str
    created: int
    revoked: int | None = None


@dataclasses.dataclass(frozen=True)
class SigningKeyRecord:
    id: str  # adapters.keys key id
    tenant: str
    public: str  # the public key document (JSON text, adapters.keys format)
    created: int
    revoked: int | None = None


@dataclasses.dataclass(frozen=True)
class AdapterRecord:
    tenant: str
    name: str
    version: str
    blob: str  # name of the stored package in the blob store
    size: int
    sha256: str  # of the package as stored
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    signer: str  # signing key id that verified it
    created: int

    @property
    def key(self) -> str:
        """The internal handle used by the cache and the backends; never sent by tenants."""
        return f"{self.tenant}/{self.name}@{self.version}"


@dataclasses.dataclass(frozen=True)
class UsageRow:
    tenant: str
    day: str  # YYYY-MM-DD (UTC)
    model: str  # base model or adapter name
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class AuditHead:
    """The last entry's seq and hash, stored apart from the log and written with each append,
    so that removing entries from the end of the log shows."""

    seq: int
    hash: str


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    seq: int  # 1, 2, 3, ...
    time: int
    actor: str
    action: str
    target: str
    detail: str  # JSON text
    prev_hash: str
    hash: str
