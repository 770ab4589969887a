"""``tensafe serve`` that kills itself with SIGKILL at one point of an adapter upload, for
the crash-recovery tests (``python -m tests.gateway.crashing_gateway serve ...``).

``TENSAFE_TEST_CRASH_AT`` picks the point: ``temp-written`` (the package is in its temp file,
not yet renamed into place) or ``blob-placed`` (the blob is in place, its registry record not
yet written). Without it the gateway runs as usual."""
from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str) -> None:
    if point == "temp-written":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            real_fsync(fd)
            if "/blobs/" in os.readlink(f"/proc/self/fd/{fd}"):
                _die()

        os.fsync = fsync
    elif point == "blob-placed":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs) -> None:
            real_replace(src, dst, *args, **kwargs)
            if str(dst).endswith(".tssp") and "/blobs/" in str(dst):
                _die()

        os.replace = replace
    else:
        raise SystemExit(f"unknown crash point {point!r}")


if __name__ == "__main__":
    if os.environ.get("TENSAFE_TEST_CRASH_AT"):
        _arm(os.environ["TENSAFE_TEST_CRASH_AT"])
    from gateway.cli import main

    sys.exit(main(sys.argv[1:]))
