"""Is a directory memory-backed? The agent holds decrypted adapters, which must never reach a
persistent disk: it starts only on tmpfs or ramfs (a Kubernetes ``emptyDir`` with ``medium:
Memory`` is tmpfs). The answer comes from the kernel's mount table (``/proc/self/mountinfo``):
the file system type of the mount the directory's real path lies on, the longest mount point
that contains it (so a disk mounted inside a tmpfs is seen as the disk it is)."""
from __future__ import annotations

import os
from pathlib import Path

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """Mount points escape space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the file system ``path`` (which must exist) is on, e.g. ``tmpfs``, ``ext4``."""
    real = os.path.realpath(path)
    text = MOUNTINFO.read_text() if mountinfo is None else mountinfo
    best, kind = "", ""
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        mount = _unescape(fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


def is_memory_backed(path: Path, mountinfo: str | None = None) -> bool:
    return filesystem_type(path, mountinfo) in MEMORY_FILESYSTEMS
