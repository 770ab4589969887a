"""Operator verbs: ``tensafe keys rotate-recipient``, ``tensafe audit verify`` (both work on
the data directory and store directly, with the server up or down) and ``tensafe admin ...``,
a thin client of the admin API."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..settings import Settings, SettingsError


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("store_url", args.store_url)) if v}
    return Settings.load(overrides, file=args.config)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="the gateway's data directory (default from settings)")
    p.add_argument("--store-url", default=None, help="sqlite:///file or redis://host:port/db")
    p.add_argument("--config", default=None, help="TOML settings file")


def cmd_rotate_recipient(args: argparse.Namespace) -> int:
    from ..tenancy.keyprovider import PROVIDERS

    settings = _settings(args)
    provider = PROVIDERS[settings.key_provider](settings.data_dir)
    key = provider.rotate_recipient()
    print(json.dumps({"key_id": key.key_id, "created": key.created, "current": True,
                      "readable": [k.key_id for k in provider.recipient_keys()]}))
    print("Restart the gateway (every replica) to start wrapping to the new key.", file=sys.stderr)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from ..store import AuditHead, open_store, verify_store

    async def run() -> tuple[int, list[str], AuditHead | None]:
        store = open_store(_settings(args).resolved_store_url())
        await store.init()
        try:
            return await verify_store(store)
        finally:
            await store.close()

    count, problems, head = asyncio.run(run())
    print(json.dumps({"entries": count, "intact": not problems, "problems": problems,
                      "head": dataclasses.asdict(head) if head is not None else None}))
    return 0 if not problems else 1


#: admin verb -> (HTTP method, path template, body builder from the parsed args)
ADMIN_VERBS: dict[str, tuple[str, str, Any]] = {
    "tenants-create": ("POST", "/admin/tenants",
                       lambda a: {"id": a.target, "name": a.name or a.target, "quotas": json.loads(a.quotas or "{}")}),
    "tenants-list": ("GET", "/admin/tenants", None),
    "tenants-get": ("GET", "/admin/tenants/{target}", None),
    "tenants-suspend": ("PATCH", "/admin/tenants/{target}", lambda a: {"suspended": True}),
    "tenants-resume": ("PATCH", "/admin/tenants/{target}", lambda a: {"suspended": False}),
    "tenants-quotas": ("PATCH", "/admin/tenants/{target}", lambda a: {"quotas": json.loads(a.quotas or "{}")}),
    "tenants-delete": ("DELETE", "/admin/tenants/{target}", None),
    "keys-issue": ("POST", "/admin/tenants/{target}/keys",
                   lambda a: {"scopes": (a.scopes or "tenant").split(","), "name": a.name or ""}),
    "keys-list": ("GET", "/admin/tenants/{target}/keys", None),
    "keys-revoke": ("DELETE", "/admin/keys/{target}", None),
    "metrics-key": ("POST", "/admin/keys", lambda a: {"scopes": ["metrics"], "name": a.name or "metrics"}),
    "backends": ("GET", "/admin/backends", None),
    "backends-drain": ("POST", "/admin/backends/{target}/drain", None),
    "backends-undrain": ("POST", "/admin/backends/{target}/undrain", None),
    "signing-keys-add": ("POST", "/admin/tenants/{target}/signing-keys", lambda a: _public_pems(a.public)),
    "signing-keys-list": ("GET", "/admin/tenants/{target}/signing-keys", None),
    "usage": ("GET", "/admin/tenants/{target}/usage", None),
    "adapters-list": ("GET", "/admin/adapters", None),
    "audit": ("GET", "/admin/audit", None),
    "cache": ("GET", "/admin/cache", None),
}


def _public_pems(directory: str | None) -> dict[str, str]:
    from adapters.keys import load_signing_public

    if not directory:
        raise SystemExit("--public DIR (a signing key directory) is required")
    return {k: v.decode() for k, v in load_signing_public(directory).to_pems().items()}


def cmd_admin(args: argparse.Namespace) -> int:
    import httpx

    method, template, body = ADMIN_VERBS[args.verb]
    if "{target}" in template and not args.target:
        print(f"tensafe admin {args.verb}: a TARGET is required", file=sys.stderr)
        return 2
    key = args.key or os.environ.get("TENSAFE_ADMIN_KEY")
    if not key:
        path = Path(args.data_dir or ".data") / "admin-api-key"
        key = path.read_text().strip() if path.exists() else ""
    response = httpx.request(method, args.url.rstrip("/") + template.format(target=args.target),
                             json=body(args) if body else None, headers={"authorization": f"Bearer {key}"},
                             timeout=60)
    print(json.dumps(response.json(), indent=2))
    return 0 if response.is_success else 1


def register(subparsers: argparse._SubParsersAction, groups: dict[str, Any]) -> None:
    p = groups["keys"].add_parser("rotate-recipient", help="add a new current recipient key to the gateway")
    _common(p)
    p.set_defaults(func=_guard(cmd_rotate_recipient))
    audit = subparsers.add_parser("audit", help="the audit log")
    verbs = audit.add_subparsers(dest="audit_command", required=True)
    p = verbs.add_parser("verify", help="check the audit log's hash chain (exit 1 if broken)")
    _common(p)
    p.set_defaults(func=_guard(cmd_audit_verify))
    p = subparsers.add_parser("admin", help="call the admin API",
                              description="Verbs: " + ", ".join(ADMIN_VERBS))
    p.add_argument("verb", choices=sorted(ADMIN_VERBS), metavar="VERB")
    p.add_argument("target", nargs="?", default=None, help="tenant id or key id")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=None, help="admin API key (default TENSAFE_ADMIN_KEY or DATA_DIR/admin-api-key)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--quotas", default=None, help='JSON, e.g. {"requests_per_min": 60}')
    p.add_argument("--scopes", default=None, help="comma-separated: tenant,tenant-admin")
    p.add_argument("--public", default=None, help="signing key directory (public PEMs)")
    p.set_defaults(func=cmd_admin)


def _guard(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except SettingsError as exc:
            print(f"tensafe: {exc}", file=sys.stderr)
            return 2
    return run
