"""The disk tier for TSSP packages: a stored package (still encrypted, as uploaded) is read,
its signatures checked against its tenant's trusted keys, its data key unwrapped with the
gateway's recipient keys and its payload decrypted and validated, all off the event loop.
The plaintext lives only in the returned tensors, in RAM."""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from adapters.base_model import BaseModelSpec
from adapters.errors import InvalidPackage
from adapters.keys import RecipientPrivateKey, SigningPublicKey
from adapters.package import open_package

from .errors import AdapterUnavailable
from .types import Decrypted


@dataclasses.dataclass(frozen=True)
class PackageRef:
    """Where a registered adapter's package is and whom to trust for it."""

    tenant: str
    path: Path
    trusted_signers: tuple[SigningPublicKey, ...]


class TsspSource:
    def __init__(
        self,
        lookup: Callable[[str], Awaitable[PackageRef]],
        recipient_keys: Callable[[], Sequence[RecipientPrivateKey]],
        base_model: BaseModelSpec | None = None,
    ) -> None:
        """``lookup`` resolves an adapter key to its package (raising UnknownAdapter);
        ``recipient_keys`` returns the gateway's current recipient keys (rotation-aware)."""
        self._lookup = lookup
        self._recipients = recipient_keys
        self.base_model = base_model  # set once known (the first backend says what it serves)

    async def open(self, key: str) -> Decrypted:
        ref = await self._lookup(key)
        return await asyncio.to_thread(self._open, key, ref, tuple(self._recipients()))

    def _open(self, key: str, ref: PackageRef, recipients: tuple[RecipientPrivateKey, ...]) -> Decrypted:
        try:
            data = ref.path.read_bytes()
        except OSError as exc:
            raise AdapterUnavailable(key, f"package unreadable: {exc.strerror or exc}") from None
        try:
            opened = open_package(data, trusted_signers=ref.trusted_signers, recipient_keys=recipients,
                                  base_model=self.base_model)
        except InvalidPackage:
            raise AdapterUnavailable(key, "stored package failed verification") from None
        m = opened.manifest
        if m.tenant != ref.tenant:
            raise AdapterUnavailable(key, "stored package belongs to another tenant")
        return Decrypted(
            key=key,
            tenant=ref.tenant,
            lora=m.lora(),
            tensors=opened.tensors,
            nbytes=sum(t.numel() * t.element_size() for t in opened.tensors.values()),
        )
