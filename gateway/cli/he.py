"""``tensafe he``: HE-LoRA research mode (``privacy/``: CKKS with TenSEAL).

- ``he keys --out DIR``: a tenant's key: ``secret.ctx`` (0600) and ``server.ctx``.
- ``he encrypt PEFT_DIR --keys DIR --modules q_proj --layers 0,1 -o FILE``: those (layer,
  module) pairs of a PEFT adapter encrypted under the tenant's key (an adapter of mode ``he``).
- ``he key-holder --keys DIR``: the tenant's key holder over HTTP; its bearer tokens come from
  ``TENSAFE_HE_TOKENS`` (comma-separated; flags would show in process lists).
- ``he generate --adapter FILE --server-context FILE --key-holder URL --prompt ...``: greedy
  generation whose targeted modules take their deltas from the encrypted adapter, each one
  decrypted by the key holder (token in ``TENSAFE_HE_TOKEN``). It runs on its own model copy
  (engine.DeltaGenerator), one sequence, never in a serving engine's shared batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from adapters.lora import LoraConfig
    from engine import DeltaGenerator, DeltaHook
    from privacy.adapter import HeLora


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("he", help="HE-LoRA research mode: CKKS-encrypted adapters, deltas decrypted by "
                                         "the tenant's key holder")
    sub = p.add_subparsers(dest="he_command", required=True, metavar="VERB")

    k = sub.add_parser("keys", help="make a tenant's HE key (secret.ctx 0600, server.ctx)")
    k.add_argument("--out", required=True, metavar="DIR")
    k.set_defaults(func=cmd_keys)

    e = sub.add_parser("encrypt", help="encrypt chosen modules and layers of a PEFT adapter under a tenant's key")
    e.add_argument("peft_dir")
    e.add_argument("--keys", required=True, metavar="DIR", help="the tenant's key directory (secret.ctx)")
    e.add_argument("--modules", required=True, help="comma-separated target modules, e.g. q_proj,v_proj")
    e.add_argument("--layers", required=True, help="comma-separated layers or ranges, e.g. 0,1 or 0-3")
    e.add_argument("-o", "--output", required=True)
    e.set_defaults(func=cmd_encrypt)

    h = sub.add_parser("key-holder", help="serve the tenant's key holder (tokens in TENSAFE_HE_TOKENS)")
    h.add_argument("--keys", required=True, metavar="DIR", help="the tenant's key directory (secret.ctx)")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, default=8700)
    h.set_defaults(func=cmd_key_holder)

    g = sub.add_parser("generate", help="greedy generation with an encrypted adapter (token in TENSAFE_HE_TOKEN)")
    g.add_argument("--adapter", required=True, help="an encrypted adapter file (he encrypt)")
    g.add_argument("--server-context", required=True, help="the tenant's server.ctx (no secret key)")
    g.add_argument("--key-holder", required=True, metavar="URL")
    g.add_argument("--prompt", required=True, help="user message (or raw prompt with --raw)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--model", default=None, help="model name or checkpoint directory (default: the engine's)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--ca-file", default=None, help="CA bundle an https:// key holder is verified against")
    g.set_defaults(func=cmd_generate)


def parse_layers(spec: str) -> list[int]:
    """``0,1`` or ``0-3,7`` -> sorted layer numbers."""
    layers: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi) if hi else int(lo)
        if a < 0 or b < a:
            raise ValueError(f"bad layer range {part!r}")
        layers.update(range(a, b + 1))
    if not layers:
        raise ValueError("no layers given")
    return sorted(layers)


# ---- what the verbs, the tests and the benchmark share ---------------------------------------
def he_hook(he: "HeLora") -> "DeltaHook":
    """The engine's delta hook backed by an encrypted adapter and its key holder."""
    import torch

    def hook(layer: int, module: str, x: "torch.Tensor") -> "torch.Tensor":
        return torch.from_numpy(he.delta(layer, module, x.detach().double().cpu().numpy()))

    return hook


def plaintext_hook(config: "LoraConfig", tensors: Mapping[str, "torch.Tensor"]) -> "DeltaHook":
    """The same adapter's deltas in plaintext (the reference for ``he_hook``)."""
    from adapters.validate import lora_tensor_name

    def hook(layer: int, module: str, x: "torch.Tensor") -> "torch.Tensor":
        a = tensors[lora_tensor_name(layer, module, "A")].to(x.dtype)
        b = tensors[lora_tensor_name(layer, module, "B")].to(x.dtype)
        return config.scaling * (x @ a.T) @ b.T

    return hook


def capture_activations(generator: "DeltaGenerator", ids: Sequence[int], layer: int, module: str,
                        chunk: int = 256) -> "np.ndarray":
    """The real inputs of ``module`` at ``layer`` for each token of ``ids`` (prefilled ``chunk``
    tokens at a time, each chunk a sequence of its own): ``[tokens, in]`` float64."""
    import numpy as np
    import torch

    rows: list[np.ndarray] = []
    width = generator.dims.projection_shape(module)[1]

    def hook(layer_: int, module_: str, x: torch.Tensor) -> torch.Tensor:
        rows.append(x.detach().double().cpu().numpy().copy())
        return torch.zeros(x.shape[0], width)

    for i in range(0, len(ids), chunk):
        generator.greedy(ids[i : i + chunk], 1, hook, {module: [layer]})
    return np.concatenate(rows)[: len(ids)]


# ---- verbs -------------------------------------------------------------------------------------
def cmd_keys(args: argparse.Namespace) -> int:
    from privacy.ckks import CkksError
    from privacy.keyfiles import make_keys

    try:
        secret, server = make_keys(args.out)
    except (CkksError, OSError) as exc:
        print(f"tensafe he keys: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"secret": str(secret), "server": str(server)}))
    return 0


def cmd_encrypt(args: argparse.Namespace) -> int:
    from adapters.errors import InvalidAdapter
    from adapters.peft import read_peft_dir
    from privacy.adapter import encrypt_adapter
    from privacy.ckks import CkksError
    from privacy.keyfiles import read_context

    try:
        layers = parse_layers(args.layers)
        modules = [m.strip() for m in args.modules.split(",") if m.strip()]
        config, tensors = read_peft_dir(args.peft_dir)
        ctx = read_context(args.keys, private=True)
        t0 = time.perf_counter()
        adapter = encrypt_adapter(ctx, config, tensors, {m: layers for m in modules})
        data = adapter.serialize()
        Path(args.output).write_bytes(data)
    except (ValueError, InvalidAdapter, CkksError, OSError) as exc:
        print(f"tensafe he encrypt: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"output": args.output, "bytes": len(data), "modules": adapter.targets,
                      "seconds": round(time.perf_counter() - t0, 3)}))
    return 0


def cmd_key_holder(args: argparse.Namespace) -> int:
    from privacy.ckks import CkksError
    from privacy.keyfiles import SECRET_FILE, read_context
    from privacy.keyholder import run

    tokens = tuple(t for t in (p.strip() for p in os.environ.get("TENSAFE_HE_TOKENS", "").split(",")) if t)
    if not tokens:
        print("tensafe he key-holder: set TENSAFE_HE_TOKENS (comma-separated bearer tokens)", file=sys.stderr)
        return 2
    try:
        read_context(args.keys, private=True)  # fail early, with a message, on a wrong file
        secret = (Path(args.keys) / SECRET_FILE if Path(args.keys).is_dir() else Path(args.keys)).read_bytes()
    except (CkksError, OSError) as exc:
        print(f"tensafe he key-holder: {exc}", file=sys.stderr)
        return 1
    run(secret, tokens, args.host, args.port)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from engine import DEFAULT_MODEL, DeltaGenerator, default_cache_dir
    from privacy.adapter import EncryptedAdapter, HeLora
    from privacy.ckks import CkksError
    from privacy.client import KeyHolderClient, KeyHolderError
    from privacy.keyfiles import read_context

    token = os.environ.get("TENSAFE_HE_TOKEN", "")
    if not token:
        print("tensafe he generate: set TENSAFE_HE_TOKEN (the key holder's bearer token)", file=sys.stderr)
        return 2
    try:
        ctx = read_context(args.server_context, private=False)
        adapter = EncryptedAdapter.load(ctx, Path(args.adapter).read_bytes())
    except (CkksError, OSError, ValueError) as exc:
        print(f"tensafe he generate: {exc}", file=sys.stderr)
        return 1
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    generator = DeltaGenerator.load(args.model or DEFAULT_MODEL, default_cache_dir(), dtype=dtype)
    ids = generator.tokenizer.tokenize(prompt=args.prompt) if args.raw else generator.tokenizer.tokenize(
        messages=[_user(args.prompt)])
    with KeyHolderClient(args.key_holder, token, verify=args.ca_file or True) as client:
        he = HeLora(adapter, client)
        t0 = time.perf_counter()
        try:
            out = generator.greedy(ids, args.max_tokens, he_hook(he), adapter.targets)
        except KeyHolderError as exc:
            print(f"tensafe he generate: {exc}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - t0
    print(generator.tokenizer.decode(out))
    s = he.stats
    print(json.dumps({"prompt_tokens": len(ids), "completion_tokens": len(out), "seconds": round(seconds, 3),
                      "round_trips": s.round_trips, "server_s": round(s.server_s, 3),
                      "key_holder_s": round(s.key_holder_s, 3), "bytes_sent": s.bytes_sent,
                      "bytes_received": s.bytes_received}), file=sys.stderr)
    return 0


def _user(text: str):
    from engine import ChatMessage

    return ChatMessage(role="user", content=text)
