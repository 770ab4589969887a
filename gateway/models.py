"""What a caller may name in ``model``: the base model (an adapter with the reserved id None)
or an adapter, resolved to the backend's internal adapter id. Callers never see or send
internal ids."""
from __future__ import annotations

import dataclasses

from .auth import Principal
from .errors import ModelNotFound


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    model: str  # the name the caller used (echoed in responses)
    adapter_id: str | None  # internal handle; None = the base model
    owned_by: str
    created: int


class ModelTable:
    """Base model plus operator-configured adapters (``--adapters name=PEFT_DIR``), visible to
    every caller of this single-tenant deployment."""

    def __init__(self, base: str, created: int, owner: str = "tensafe") -> None:
        self.base = Route(base, None, owner, created)
        self._adapters: dict[str, Route] = {}

    def add_adapter(self, name: str, adapter_id: str, created: int, owner: str = "tensafe") -> None:
        if name == self.base.model or name in self._adapters:
            raise ValueError(f"model name {name!r} is already taken")
        self._adapters[name] = Route(name, adapter_id, owner, created)

    def resolve(self, name: str, principal: Principal) -> Route:
        if name == self.base.model:
            return self.base
        route = self._adapters.get(name)
        if route is None:
            raise ModelNotFound(name)
        return route

    def visible(self, principal: Principal) -> list[Route]:
        return [self.base, *self._adapters.values()]
