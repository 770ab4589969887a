"""What the backends over HTTP share (a ``tensafe worker``, a vLLM or LoRAX server, an agent):
a transport failure as a backend error, a body read leniently, adapter tensors serialised for
the wire, and the connection pool sized to the sequence slots."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from .errors import BackendError, BackendOverloaded, BackendUnavailable

#: connections beyond the generation streams: health, metrics and capacity refreshes, adapter
#: calls, aborts, tokenizing
CONTROL_CONNECTIONS = 4


def pool_limits(slots: int, queue: int) -> httpx.Limits:
    """A keep-alive pool for ``slots`` streams, what may wait beside them, and the control calls."""
    return httpx.Limits(max_connections=slots + queue + CONTROL_CONNECTIONS,
                        max_keepalive_connections=slots + CONTROL_CONNECTIONS)


def transport_error(exc: httpx.HTTPError, where: str) -> BackendError:
    """A call to ``where`` (e.g. "worker http://...") that failed below HTTP: a full pool is
    overload, anything else unavailability."""
    if isinstance(exc, httpx.PoolTimeout):
        return BackendOverloaded(f"all connections to {where} are busy")
    return BackendUnavailable(f"{where} unreachable: {type(exc).__name__}")


async def send(client: httpx.AsyncClient, where: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return await client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise transport_error(exc, where) from None


def response_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def serialise(tensors: Mapping[str, Any]) -> bytes:
    """Adapter tensors as a safetensors body (CPU, contiguous)."""
    from safetensors.torch import save

    return save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
