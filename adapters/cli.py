"""``tensafe keys ...`` and ``tensafe adapter ...``: key generation and TSSP pack/inspect/verify.

``register(subparsers)`` adds both command groups to any argparse subparsers object; each
handler is ``cmd_x(args) -> int``. Exit codes: 0 success, 1 the package or adapter is invalid
(or a signature does not verify), 2 usage or file errors. Results go to stdout, messages a
person can act on to stderr. ``-v`` shows, through logging, which check rejected a package: the
library never puts that in the error itself (see ``InvalidPackage``).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from .base_model import BaseModelSpec
from .errors import BaseModelConfigError, InvalidAdapter, InvalidPackage, KeyFileError, UsageError
from .format import HEADER_LENGTH
from .keys import (
    RecipientPublicKey,
    current_recipient_from_document,
    generate_recipient_key,
    generate_signing_key,
    load_recipient_private,
    load_recipient_public,
    load_signing_private,
    load_signing_public,
    save_recipient_key,
    save_signing_key,
)
from .limits import Limits
from .package import inspect, open_package, pack, read_unverified_manifest

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
_MAX_JSON_BYTES = 1024 * 1024


def _err(message: str) -> None:
    print(f"tensafe: {message}", file=sys.stderr)


def _command(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn our errors into a message on stderr and an exit code."""
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        verbose = getattr(args, "verbose", False)
        log = logging.getLogger("adapters")
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        if verbose:
            log.addHandler(stream)
            log.setLevel(logging.INFO)
        try:
            return handler(args)
        except InvalidPackage:
            _err("invalid package: verification failed"
                 + ("" if verbose else " (add -v to see which check)"))
            return EXIT_INVALID
        except InvalidAdapter as exc:
            _err(f"invalid adapter: {exc.problem}")
            return EXIT_INVALID
        except (KeyFileError, BaseModelConfigError, UsageError) as exc:
            _err(str(exc))
            return EXIT_USAGE
        finally:
            if verbose:
                log.removeHandler(stream)
                log.setLevel(logging.NOTSET)
    return run


def _read_file(path: str, limit: int, what: str) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > limit:
            raise UsageError(f"{path}: {what} of {size} bytes exceeds the limit of {limit}")
        with open(path, "rb") as fh:
            return fh.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc.strerror})") from None


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(_read_file(path, _MAX_JSON_BYTES, what))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path}: {what} is not valid JSON ({exc})") from None


def _read_package(path: str) -> bytes:
    limits = Limits()
    limit = HEADER_LENGTH + limits.max_manifest_bytes + limits.max_payload_bytes + 8192
    return _read_file(path, limit, "package")


def _recipient(path: str) -> RecipientPublicKey:
    """A directory of public PEMs, the gateway's recipient key JSON document, or its URL
    (``https://gateway/v1/tssp/recipient``)."""
    if path.startswith(("https://", "http://")):
        import httpx

        try:
            response = httpx.get(path, timeout=30, follow_redirects=True)
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise KeyFileError(f"cannot fetch the recipient key document: {exc}") from None
        return current_recipient_from_document(document)
    if Path(path).is_dir():
        return load_recipient_public(path)
    return current_recipient_from_document(_read_json(path, "recipient key document"))


def _base_spec(path: str | None, model_id: str) -> BaseModelSpec | None:
    if path is None:
        return None
    return BaseModelSpec.from_hf_config(model_id, _read_json(path, "base model config"))


def _write_atomically(path: str, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a package."""
    target = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise UsageError(f"{path}: cannot write package ({exc.strerror})") from None


@_command
def cmd_keys_signing(args: argparse.Namespace) -> int:
    key = generate_signing_key()
    save_signing_key(args.out, key)
    print(key.key_id)
    _err(f"signing key written to {args.out}; give the gateway its *_public.pem files")
    return EXIT_OK


@_command
def cmd_keys_recipient(args: argparse.Namespace) -> int:
    key = generate_recipient_key()
    save_recipient_key(args.out, key)
    print(key.key_id)
    _err(f"recipient key written to {args.out}; back up its *_private.pem files")
    return EXIT_OK


@_command
def cmd_adapter_pack(args: argparse.Namespace) -> int:
    signer = load_signing_private(args.sign)
    recipient = _recipient(args.recipient)
    data = pack(args.peft_dir, tenant=args.tenant, name=args.name, version=args.version,
                base_model=args.base_model, signer=signer, recipient=recipient,
                created=args.created, base_spec=_base_spec(args.base_config, args.base_model))
    _write_atomically(args.output, data)
    _err(f"packed {args.name} {args.version} for tenant {args.tenant} -> {args.output} "
         f"({len(data)} bytes; signer {signer.key_id[:16]}..., "
         f"recipient {recipient.key_id[:16]}...)")
    return EXIT_OK


@_command
def cmd_adapter_inspect(args: argparse.Namespace) -> int:
    data = _read_package(args.file)
    if args.signer:
        manifest = inspect(data, trusted_signers=[load_signing_public(d) for d in args.signer])
        note = f"signatures verified (signer {manifest.signer_key_id})"
    else:
        manifest = read_unverified_manifest(data)
        note = "signatures were NOT verified (pass --signer DIR to verify them)"
    print(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    _err(note)
    return EXIT_OK


@_command
def cmd_adapter_verify(args: argparse.Namespace) -> int:
    data = _read_package(args.file)
    signers = [load_signing_public(d) for d in args.signer]
    if not args.recipient_key:
        manifest = inspect(data, trusted_signers=signers)
        print(f"OK: both signatures verify (signer {manifest.signer_key_id}); payload not "
              "decrypted (pass --recipient-key DIR to decrypt and validate it)")
        return EXIT_OK
    recipients = [load_recipient_private(d) for d in args.recipient_key]
    unverified = read_unverified_manifest(data)
    opened = open_package(data, trusted_signers=signers, recipient_keys=recipients,
                          base_model=_base_spec(args.base_config, unverified.base_model),
                          verify_digest=True)
    shapes = "against the base model config" if args.base_config else "structure only"
    print(f"OK: signatures verify (signer {opened.manifest.signer_key_id}); decrypted "
          f"{len(opened.tensors)} tensors; payload SHA-256 matches; adapter valid ({shapes})")
    return EXIT_OK


def register(subparsers: Any) -> dict[str, Any]:
    """Add the ``keys`` and ``adapter`` command groups to an argparse subparsers object;
    returns the groups' subparsers so other packages can add verbs to them."""
    def add(group: Any, name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        parser = group.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("-v", "--verbose", action="store_true",
                            help="log which check rejected a package")
        parser.set_defaults(func=handler)
        return parser

    keys = subparsers.add_parser("keys", help="generate signing or recipient keys")
    key_cmds = keys.add_subparsers(dest="keys_command", metavar="{signing,recipient}",
                                   required=True)
    p = add(key_cmds, "signing", cmd_keys_signing, "new Ed25519 + ML-DSA-65 signing key (tenant)")
    p.add_argument("--out", required=True, metavar="DIR", help="new key directory")
    p = add(key_cmds, "recipient", cmd_keys_recipient,
            "new X25519 + ML-KEM-768 recipient key (gateway)")
    p.add_argument("--out", required=True, metavar="DIR", help="new key directory")

    adapter = subparsers.add_parser("adapter", help="pack, inspect and verify TSSP packages")
    cmds = adapter.add_subparsers(dest="adapter_command", metavar="{pack,inspect,verify}",
                                  required=True)
    p = add(cmds, "pack", cmd_adapter_pack, "sign and encrypt a PEFT LoRA adapter into a .tssp")
    p.add_argument("peft_dir", metavar="PEFT_DIR")
    p.add_argument("--tenant", required=True, metavar="ID")
    p.add_argument("--name", required=True, metavar="NAME")
    p.add_argument("--version", default="1", metavar="V")
    p.add_argument("--base-model", required=True, metavar="ID")
    p.add_argument("--sign", required=True, metavar="DIR", help="signing key directory")
    p.add_argument("--recipient", required=True, metavar="DIR|JSON",
                   help="recipient public key directory, or the gateway's recipient key JSON")
    p.add_argument("-o", "--output", required=True, metavar="FILE.tssp")
    p.add_argument("--base-config", metavar="CONFIG_JSON",
                   help="base model config.json: also check shapes against it")
    p.add_argument("--created", type=int, default=None, help=argparse.SUPPRESS)
    p = add(cmds, "inspect", cmd_adapter_inspect, "print a package's manifest")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--signer", action="append", metavar="DIR",
                   help="trusted signing key directory (repeatable); verifies signatures")
    p = add(cmds, "verify", cmd_adapter_verify,
            "verify a package (and decrypt it with a recipient key)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--signer", action="append", required=True, metavar="DIR",
                   help="trusted signing key directory (repeatable)")
    p.add_argument("--recipient-key", action="append", metavar="DIR",
                   help="recipient private key directory (repeatable): decrypt and validate")
    p.add_argument("--base-config", metavar="CONFIG_JSON",
                   help="base model config.json to validate shapes against")
    return {"keys": key_cmds, "adapter": cmds}
