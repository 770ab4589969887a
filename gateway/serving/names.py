"""What a caller may name in ``model``: the base model (an adapter with the reserved id None),
an adapter of the caller's own tenant, or an operator-configured development adapter. The
name resolves to the backend's internal adapter key; callers never see or send those keys.
Another tenant's adapter resolves exactly like a missing one (404).

What a name resolves to is its ``Target``. A tenant adapter's target is remembered for
``cache_ttl_s`` (see ``tenancy.remembered``), so a busy adapter costs no registry read per
request; ``forget`` drops every remembered target (an adapter was deleted). Misses are never remembered, so a new upload is visible at once."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from ..errors import ModelNotFound
from ..store import Store
from ..tenancy.auth import Principal
from ..tenancy.remembered import Remembered


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    model: str  # the name the caller used (echoed in responses)
    adapter_id: str | None  # internal key; None = the base model
    owned_by: str
    created: int
    tenant_adapter: bool = False  # a tenant's uploaded adapter, served through the tiered cache
    rank: int = 0  # the adapter's LoRA rank (0 for the base model)


class ModelNames:
    def __init__(self, base: str, created: int, store: Store | None = None, owner: str = "tensafe", *,
                 cache_ttl_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.base = Target(base, None, owner, created)
        self.store = store
        self._local: dict[str, Target] = {}
        self._remembered: Remembered[tuple[str, str], Target] = Remembered(cache_ttl_s, clock)  # (tenant, name)

    def forget(self) -> None:
        self._remembered.clear()

    def add_local(self, name: str, adapter_id: str, created: int, owner: str = "tensafe", rank: int = 0) -> None:
        """A development adapter loaded from a PEFT directory, visible to every caller."""
        if name == self.base.model or name in self._local:
            raise ValueError(f"model name {name!r} is already taken")
        self._local[name] = Target(name, adapter_id, owner, created, rank=rank)

    def reserved(self) -> set[str]:
        return {self.base.model, *self._local}

    async def resolve(self, name: str, principal: Principal) -> Target:
        if name == self.base.model:
            return self.base
        target = self._local.get(name)
        if target is not None:
            return target
        if self.store is not None and principal.tenant is not None:
            key = (principal.tenant, name)
            target = self._remembered.get(key)
            if target is not None:
                return target
            token = self._remembered.token()
            record = await self.store.get_adapter(principal.tenant, name)
            if record is not None:
                target = Target(name, record.key, principal.tenant, record.created, tenant_adapter=True,
                                rank=record.rank)
                self._remembered.put(key, target, token)
                return target
        raise ModelNotFound(name)

    async def visible(self, principal: Principal) -> list[Target]:
        targets = [self.base, *self._local.values()]
        if self.store is not None and principal.tenant is not None:
            after = None
            while batch := await self.store.list_adapters(principal.tenant, 100, after):
                targets += [Target(r.name, r.key, r.tenant, r.created, tenant_adapter=True, rank=r.rank)
                            for r in batch]
                after = batch[-1].name
        return targets
