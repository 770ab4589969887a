"""Fresh values for the Secrets the manifests reference (deploy/secrets.example.env lists them),
written one env file per Secret, mode 0600, for ``kubectl create secret generic NAME
--from-env-file=DIR/NAME.env``. Run with the project installed (``make install``)::

    .venv/bin/python deploy/make_secrets.py new DIR            # every Secret but tensafe-metrics-key
    .venv/bin/python deploy/make_secrets.py add-recipient DIR/tensafe-gateway-keys.env

``add-recipient`` appends a new current recipient key to ``recipient-keys`` (newest last; the
older keys stay and keep opening the packages wrapped to them). ``tensafe-metrics-key`` holds a
key the running gateways issue (README, "Kubernetes"), so it is not made here. Nothing is
printed but the file names.
"""
from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def recipient_entry(created: int) -> str:
    """One ``created:base64(private key)`` item of TENSAFE_RECIPIENT_KEYS."""
    from adapters.keys import generate_recipient_key

    return f"{created}:{base64.b64encode(generate_recipient_key().to_bytes()).decode()}"


def fresh(now: int | None = None) -> dict[str, dict[str, str]]:
    """Secret name -> key -> value. Tokens are URL-safe (they sit in URLs and JSON as they are)."""
    now = int(time.time()) if now is None else now
    worker, agent = _token("wk-"), _token("ag-")
    return {
        "tensafe-gateway-keys": {"admin-key": _token("tsk-"), "hashing-key": secrets.token_hex(32),
                                 "recipient-keys": recipient_entry(now)},
        "tensafe-redis": {"password": secrets.token_hex(32)},
        # accepted: what the workers (agents) take, two comma-separated while rotating;
        # current: the one the gateways send
        "tensafe-worker-tokens": {"accepted": worker, "current": worker},
        "tensafe-agent-tokens": {"accepted": agent, "current": agent},
        "tensafe-vllm-api-key": {"api-key": _token("vk-")},
    }


def write_env(path: Path, values: dict[str, str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in values.items())


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deploy/make_secrets.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    new = sub.add_parser("new", help="write a fresh env file per Secret into DIR")
    new.add_argument("dir", type=Path)
    add = sub.add_parser("add-recipient", help="append a new current recipient key to a gateway-keys env file")
    add.add_argument("file", type=Path)
    args = ap.parse_args(argv)
    if args.verb == "new":
        args.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, values in fresh().items():
            write_env(args.dir / f"{name}.env", values)
            print(args.dir / f"{name}.env")
        return 0
    values = read_env(args.file)
    created = max(int(item.split(":", 1)[0]) for item in values["recipient-keys"].split(","))
    values["recipient-keys"] += "," + recipient_entry(max(int(time.time()), created + 1))
    write_env(args.file, values)
    print(args.file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
