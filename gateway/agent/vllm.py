"""The few calls the agent makes to the vLLM server beside it: register an adapter from a path,
unregister it, list what is registered (``GET /v1/models``: adapters carry a ``parent``), and
its health. vLLM's API key is sent when set and never logged."""
from __future__ import annotations

from typing import Any

import httpx

from ..backends.errors import AdapterProblem, BackendUnavailable


class VllmAdmin:
    kind = "vllm"
    lists_adapters = True

    def __init__(self, url: str, api_key: str = "", *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.url, headers=headers,
                                         timeout=httpx.Timeout(timeout_s, connect=2.0))

    def __repr__(self) -> str:
        return f"VllmAdmin({self.url!r})"

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"vLLM at {self.url} unreachable: {type(exc).__name__}") from None

    async def load(self, name: str, path: str) -> None:
        r = await self._call("POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if r.status_code == 200:
            return
        detail = _message(r)
        if r.status_code in (400, 404, 422) and "already" not in detail.lower():
            raise AdapterProblem(f"vLLM refused adapter {name!r}: {detail}", name, "invalid")
        if "already" in detail.lower():
            return  # registered by an earlier call whose answer was lost
        if r.status_code == 500 and await self.healthy():  # it failed on the files, not in its engine
            raise AdapterProblem(f"vLLM could not load adapter {name!r}: {detail}", name, "invalid")
        raise BackendUnavailable(f"vLLM answered {r.status_code} loading {name!r}: {detail}")

    async def unload(self, name: str) -> None:
        """Unregister ``name``; one vLLM does not have counts as done."""
        r = await self._call("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code == 200 or r.status_code in (400, 404):
            return
        raise BackendUnavailable(f"vLLM answered {r.status_code} unloading {name!r}: {_message(r)}")

    async def registered(self) -> dict[str, str]:
        """The adapters vLLM has registered: name -> the path it reads them from."""
        r = await self._call("GET", "/v1/models")
        if r.status_code != 200:
            raise BackendUnavailable(f"vLLM answered {r.status_code} listing models")
        try:
            data = r.json()["data"]
            return {m["id"]: str(m.get("root") or "") for m in data if m.get("parent")}
        except (ValueError, KeyError, TypeError):
            raise BackendUnavailable("vLLM sent a model list that is not OpenAI's") from None

    async def healthy(self) -> bool:
        try:
            return (await self._call("GET", "/health")).status_code == 200
        except BackendUnavailable:
            return False


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message", ""))[:300]
        return str(body.get("message") or body.get("detail") or body)[:300]
    return str(body)[:300]
