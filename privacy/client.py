"""The server's client of the tenant's key holder (``privacy.keyholder``), over HTTP with the
tenant's bearer token. Synchronous: it is called from inside a forward pass."""
from __future__ import annotations

from collections.abc import Sequence

import httpx
import numpy as np

from . import wire
from .keyholder import BUNDLE, MAX_CIPHERTEXTS, error_message


class KeyHolderError(RuntimeError):
    """The key holder refused a request or could not be reached."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"key holder: {status or 'unreachable'}: {message}")
        self.status = status


class KeyHolderClient:
    def __init__(self, url: str, token: str, *, timeout_s: float = 60.0, verify: bool | str = True) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, verify=verify,
                                  headers={"authorization": f"Bearer {token}", "content-type": BUNDLE})

    def __repr__(self) -> str:  # the token stays out of reprs and logs
        return f"KeyHolderClient({self._http.base_url})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "KeyHolderClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, header: dict, blobs: Sequence[bytes]) -> tuple[dict, list[bytes]]:
        try:
            response = self._http.post(path, content=wire.pack(header, blobs))
        except httpx.HTTPError as exc:
            raise KeyHolderError(None, f"{type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise KeyHolderError(response.status_code, error_message(response.content))
        try:
            return wire.unpack(response.content, max_blobs=MAX_CIPHERTEXTS * 64)
        except wire.WireError as exc:
            raise KeyHolderError(200, f"unreadable answer: {exc}") from None

    def refresh(self, stage_ones: Sequence[bytes], rank: int, width: int) -> list[bytes]:
        return self._post("/v1/refresh", {"rank": rank, "width": width}, stage_ones)[1]

    def decrypt(self, stage_twos: Sequence[bytes], rank: int, width: int) -> np.ndarray:
        header, blobs = self._post("/v1/decrypt", {"rank": rank, "width": width}, stage_twos)
        shape = header.get("shape")
        if (len(blobs) != 1 or not isinstance(shape, list) or len(shape) != 2
                or len(blobs[0]) != 8 * int(np.prod(shape))):
            raise KeyHolderError(200, "the deltas do not match their declared shape")
        return np.frombuffer(blobs[0], dtype="<f8").reshape(shape).astype(np.float64)
