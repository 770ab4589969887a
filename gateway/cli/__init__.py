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

    parser, sub = _parser()
    from adapters import cli as adapters_cli

    from . import admin, agent, he, serve, vllm, worker

    engine_cli.register(sub)
    groups = adapters_cli.register(sub)
    serve.register(sub)
    worker.register(sub)
    agent.register(sub)
    vllm.register(sub)
    he.register(sub)
    admin.register(sub, groups)
    return parser


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="tensafe", description="TenSafe Gateway: multi-tenant LoRA serving")
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agent"]:  # the sidecar's verb: the engine's CLI (and torch) stay unimported
        from . import agent

        parser, sub = _parser()
        agent.register(sub)
    else:
        parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)

