"""``tensafe agent``: the writer of one vLLM or LoRAX server's adapters, beside it (a sidecar in its pod).
It takes every setting as a flag, like ``serve``; its own are ``agent_dir`` (memory-backed),
``agent_tokens`` (prefer ``TENSAFE_AGENT_TOKENS`` to the flag: flags show in process lists),
``agent_max_bytes``, ``agent_vllm_url`` and the ``vllm`` section (``max_loras``, ``api_key``).
It imports no torch: the sidecar's image stays small."""
from __future__ import annotations

import argparse
import sys

from ..settings import SettingsError
from .serve import add_setting_flags, settings_from


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("agent", help="write decrypted adapters for the vLLM or LoRAX server beside it",
                              description="Run the adapter agent of one vLLM or LoRAX server. Flags override TENSAFE_* "
                                          "environment variables, which override the TOML file given with --config.")
    add_setting_flags(p)
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    from ..agent.server import check, run

    try:
        settings = settings_from(args)
        check(settings)
    except SettingsError as exc:
        print(f"tensafe agent: {exc}", file=sys.stderr)
        return 2
    run(settings)
    return 0
