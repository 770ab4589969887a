"""The blob store for packages as uploaded (still encrypted): a directory, shared between
replicas as a volume. Writes are atomic (temp file in the same directory, fsync, rename), so a
reader never sees half a package and a failed upload leaves nothing behind.

A process killed at the wrong moment can still leave a file behind: a temp file it was
writing, or a blob whose registry record it never wrote (or whose record it had just deleted).
``sweep`` removes both once they are older than a grace period, so an upload another replica
has in flight (its blob written, its record a moment away) is never taken.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Collection
from pathlib import Path

_NAME = re.compile(r"^[0-9a-f]{64}\.tssp$")
_TEMP = re.compile(r"^\.[0-9a-f]{64}\.tssp\.\d+\.tmp$")


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

    def candidates(self, grace_s: float, now: float | None = None) -> list[str]:
        """Temp files and blobs last written more than ``grace_s`` ago: what a sweep may remove
        once it knows which blobs the registry still names. List these *before* reading the
        registry, so a blob written after the listing is never considered."""
        cutoff = (time.time() if now is None else now) - grace_s
        out = []
        for entry in os.scandir(self.root):
            if (_NAME.match(entry.name) or _TEMP.match(entry.name)) and _mtime(entry) <= cutoff:
                out.append(entry.name)
        return sorted(out)

    def sweep(self, candidates: list[str], referenced: Collection[str]) -> list[str]:
        """Remove the ``candidates`` that are temp files or blobs no record in ``referenced``
        names; returns what was removed."""
        removed = []
        for name in candidates:
            if name in referenced:
                continue
            try:
                (self.root / name).unlink()
            except FileNotFoundError:  # another replica swept it first
                continue
            removed.append(name)
        return removed


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile: nothing to sweep
