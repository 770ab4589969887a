"""The ``tensafe`` command line: one parser, sub-commands contributed by each package.

Each package owns its verbs and exposes ``register(subparsers)``; this module only composes
them, so the import direction stays gateway -> {engine, adapters, ...}.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from engine import cli as engine_cli

    parser = argparse.ArgumentParser(prog="tensafe", description="TenSafe Gateway: multi-tenant LoRA serving")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from adapters import cli as adapters_cli

    from . import admin, serve, worker

    engine_cli.register(sub)
    groups = adapters_cli.register(sub)
    serve.register(sub)
    worker.register(sub)
    admin.register(sub, groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)

