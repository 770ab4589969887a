"""``tensafe vllm-command``: the ``vllm serve`` command line and environment the ``vllm``
settings make (the same ones the vllm backend, the agent and deploy/ use)."""
from __future__ import annotations

import argparse
import sys

from ..settings import SettingsError
from .serve import add_setting_flags, settings_from


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("vllm-command", help="print the vllm serve command the vllm settings make",
                              description="Print the environment and the vllm serve command line for the vllm "
                                          "settings ([vllm] in the TOML file, TENSAFE_VLLM_<NAME>, or --vllm JSON).")
    add_setting_flags(p)
    p.set_defaults(func=cmd_vllm_command)


def cmd_vllm_command(args: argparse.Namespace) -> int:
    from ..backends.vllm_server import vllm_command

    try:
        settings = settings_from(args)
    except SettingsError as exc:
        print(f"tensafe vllm-command: {exc}", file=sys.stderr)
        return 2
    print(vllm_command(settings).shell())
    return 0
