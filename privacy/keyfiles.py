"""A tenant's HE key directory: ``secret.ctx`` (0600: parameters and the secret key, for the key
holder and for encrypting adapters) and ``server.ctx`` (0644: parameters and relinearisation keys,
what the server is given). The secret file is created with O_EXCL at mode 0600, never readable by
others and never overwritten."""
from __future__ import annotations

import os
from pathlib import Path

import tenseal as ts

from .ckks import CkksError, load_context, new_secret_context, secret_context_bytes, server_context_bytes

SECRET_FILE = "secret.ctx"
SERVER_FILE = "server.ctx"
MAX_CONTEXT_BYTES = 64 * 2**20


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_keys(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """A fresh key in ``directory`` (created if missing); refuses to replace one."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    secret, server = root / SECRET_FILE, root / SERVER_FILE
    for path in (secret, server):
        if path.exists():
            raise CkksError(f"{path} exists: a key is never overwritten")
    ctx = new_secret_context()
    _write_new(secret, secret_context_bytes(ctx), 0o600)
    _write_new(server, server_context_bytes(ctx), 0o644)
    return secret, server


def read_context(path: str | os.PathLike[str], *, private: bool) -> ts.Context:
    """Load ``secret.ctx`` (``private``) or ``server.ctx``, checking which one it is."""
    p = Path(path)
    if p.is_dir():
        p = p / (SECRET_FILE if private else SERVER_FILE)
    if p.stat().st_size > MAX_CONTEXT_BYTES:
        raise CkksError(f"{p} is larger than a context file can be")
    ctx = load_context(p.read_bytes())
    if ctx.is_private() != private:
        raise CkksError(f"{p} {'holds no' if private else 'holds a'} secret key")
    return ctx
