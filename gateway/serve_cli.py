"""``tensafe serve``: the gateway on uvicorn. Every setting is also a flag (``--max-num-seqs 8``)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from .settings import Settings, SettingsError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible gateway",
                              description="Run the gateway. Flags override TENSAFE_* environment variables, "
                                          "which override the TOML file given with --config.")
    p.add_argument("--config", type=str, default=None, help="TOML settings file (keys = setting names)")
    hints = typing.get_type_hints(Settings)
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        if hints[field.name] is bool:
            p.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, dest=field.name, default=None, metavar=field.name.upper())
    p.set_defaults(func=cmd_serve)


def banner(settings: Settings, key: str) -> str:
    url = f"http://{settings.host}:{settings.port}"
    return f"""
TenSafe Gateway is ready on {url}  (model {settings.model_name}, backend {settings.backend})
Development API key: {key}

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{key}")
  reply = client.chat.completions.create(
      model="{settings.model_name}",
      messages=[{{"role": "user", "content": "What is the capital of France?"}}],
  )
  print(reply.choices[0].message.content)
"""


def cmd_serve(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(Settings)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    try:
        settings = Settings.load(overrides, file=args.config)
    except SettingsError as exc:
        print(f"tensafe serve: {exc}", file=sys.stderr)
        return 2
    from .server import run

    def on_ready(key: str) -> None:
        if settings.dev:
            print(banner(settings, key), flush=True)  # stdout only, never the structured logs

    run(settings, on_ready)
    return 0
