"""The blob store for packages as uploaded (still encrypted): a directory, shared between
replicas as a volume. Writes are atomic (temp file in the same directory, fsync, rename), so a
reader never sees half a package and a failed upload leaves nothing behind."""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

_NAME = re.compile(r"^[0-9a-f]{64}\.tssp$")


class BlobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError("not a blob name")
        return self.root / name

    def put(self, data: bytes) -> str:
        name = secrets.token_hex(32) + ".tssp"
        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return name

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def names(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if _NAME.match(p.name)}
