"""``tensafe serve``: the gateway on uvicorn. Every setting is also a flag (``--max-num-seqs 8``)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import TYPE_CHECKING

from ..settings import Settings, SettingsError

if TYPE_CHECKING:
    from ..app import Gateway
    from ..tenancy.bootstrap import Bootstrapped


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible gateway",
                              description="Run the gateway. Flags override TENSAFE_* environment variables, "
                                          "which override the TOML file given with --config.")
    add_setting_flags(p)
    p.set_defaults(func=cmd_serve)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and one flag per setting (``--max-num-seqs 8``, ``--dev/--no-dev``):
    every verb that runs from the settings takes them all."""
    parser.add_argument("--config", type=str, default=None, help="TOML settings file (keys = setting names)")
    hints = typing.get_type_hints(Settings)
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        if hints[field.name] is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, dest=field.name, default=None, metavar=field.name.upper())


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings from the flags ``add_setting_flags`` added, the environment and the file
    (SettingsError names a bad one)."""
    names = {f.name for f in dataclasses.fields(Settings)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return Settings.load(overrides, file=args.config)


def banner(settings: Settings, boot: Bootstrapped | None) -> str:
    url = f"http://{settings.host}:{settings.port}"
    lines = [f"\nTenSafe Gateway is ready on {url}  (model {settings.model_name}, backend {settings.backend})"]
    if boot is not None and boot.admin_key_file is not None:
        lines.append(f"Operator (admin) API key: in {boot.admin_key_file}")
    key = boot.demo_key if boot is not None else None
    if not key:
        lines.append("No demo tenant: create tenants and keys with the admin API (see README).")
        return "\n".join(lines) + "\n"
    models = ", ".join((settings.model_name, *boot.demo_models))
    lines += [
        f"Demo tenant API key: {key}",
        f"  (also in {boot.demo_key_file}; models: {models})",
        "",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{url}/v1", api_key="{key}")',
        "  reply = client.chat.completions.create(",
        f'      model="{settings.model_name}",',
        '      messages=[{"role": "user", "content": "What is the capital of France?"}],',
        "  )",
        "  print(reply.choices[0].message.content)",
        "",
    ]
    if {"demo-support", "demo-legal"} <= set(boot.demo_models):
        lines += [
            '  # or let the demo expert table pick the adapter (the x-tensafe-adapter header says which):',
            '  reply = client.chat.completions.with_raw_response.create(',
            '      model="auto", messages=[{"role": "user", "content": "I forgot my password"}])',
            '  print(reply.headers["x-tensafe-adapter"], reply.parse().choices[0].message.content)',
            "",
        ]
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except SettingsError as exc:
        print(f"tensafe serve: {exc}", file=sys.stderr)
        return 2
    from ..server import run

    def on_ready(gateway: Gateway) -> None:
        if settings.dev:
            print(banner(settings, gateway.boot), flush=True)  # stdout only, never the structured logs

    run(settings, on_ready)
    return 0
