"""``tensafe worker``: the embedded engine served over HTTP to gateways (``backend tensafe``).
It takes every setting as a flag, like ``serve``; the engine's come from the same ones
(``--max-num-seqs``, ``--model``, ...), its tokens from ``worker_tokens`` (prefer the
``TENSAFE_WORKER_TOKENS`` environment variable to the flag: flags show in process lists)."""
from __future__ import annotations

import argparse
import sys

from ..settings import SettingsError
from .serve import add_setting_flags, settings_from


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("worker", help="serve the engine to gateways over HTTP",
                              description="Run the embedded engine behind the worker API (gateways reach it with "
                                          "--backend tensafe). Flags override TENSAFE_* environment variables, "
                                          "which override the TOML file given with --config.")
    add_setting_flags(p)
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from ..bearer import parse_tokens

    try:
        settings = settings_from(args)
        if not parse_tokens(settings.worker_tokens):
            raise SettingsError("worker_tokens", "a worker needs at least one token (TENSAFE_WORKER_TOKENS or "
                                "--worker-tokens; comma-separated, two while rotating)")
    except SettingsError as exc:
        print(f"tensafe worker: {exc}", file=sys.stderr)
        return 2
    from ..worker.server import run

    run(settings)
    return 0
