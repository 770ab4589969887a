"""What the agent needs of the server beside it (``ServerAdmin``), and that for LoRAX.

vLLM registers adapters by name and lists them (``gateway.agent.vllm``). LoRAX takes an
adapter as ``adapter_source: "local"`` with its directory in each request and loads it on
first use; it has no call to register, unregister or list adapters (router/src/server.rs of
predibase/lorax at a7394ba: ``/generate``, ``/generate_stream``, ``/info``, ``/health``). So for
LoRAX registering is a no-op and the agent's own holdings are the whole truth."""
from __future__ import annotations

from typing import Protocol

import httpx


class ServerAdmin(Protocol):
    kind: str  # "vllm" | "lorax": the name /health reports the server under
    lists_adapters: bool  # whether ``registered`` is the server's own list

    async def load(self, name: str, path: str) -> None: ...

    async def unload(self, name: str) -> None: ...

    async def registered(self) -> dict[str, str]: ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...


class LoraxAdmin:
    kind = "lorax"
    lists_adapters = False

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=2.0))

    def __repr__(self) -> str:
        return f"LoraxAdmin({self.url!r})"

    async def close(self) -> None:
        await self._client.aclose()

    async def load(self, name: str, path: str) -> None:
        """LoRAX reads the directory when a request first names it."""

    async def unload(self, name: str) -> None:
        """LoRAX offloads an idle adapter by itself; deleting the files is what ends it here."""

    async def registered(self) -> dict[str, str]:
        return {}

    async def healthy(self) -> bool:
        try:
            return (await self._client.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False
