"""The ``tensafe`` command line: one parser, sub-commands contributed by each package.

Each package owns its verbs and exposes ``register(subparsers)``; this module only composes
them, so the import direction stays gateway -> {engine, adapters, ...}.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from engine import cli as engine_cli

    parser = argparse.ArgumentParser(prog="tensafe", description="TenSafe Gateway: multi-tenant LoRA serving")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine_cli.register(sub)
    for module in ("adapters.cli", "gateway.serve_cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
