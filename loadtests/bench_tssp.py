"""TSSP open latency: signatures -> validated tensors, for SmolLM2-shaped adapters.

Adapters of rank 8, 16 and 64 on all seven projections of all 30 layers (bf16) are packed
once, then opened repeatedly with ``open_package`` (base-model validation on), with and without
the upload-time digest. A second loop times each phase on its own through the same public
module functions ``open_package`` composes. Prints one JSON line; progress goes to stderr.

Bar (BENCHMARKS.md): rank 16 (~9.8 MB) p50 <= 12 ms, with digest <= 25 ms.

    python -m loadtests.bench_tssp [--repeats 100]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import cryptography
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from adapters import format as fmt
from adapters import payload
from adapters.base_model import BaseModelSpec
from adapters.hybrid_kem import unwrap_data_key
from adapters.keys import generate_recipient_key, generate_signing_key
from adapters.limits import Limits
from adapters.manifest import Manifest
from adapters.package import open_package, pack
from adapters.lora import LoraConfig
from adapters.signatures import find_verifying_signer
from adapters.validate import lora_tensor_name, validate_specs

SMOLLM2 = BaseModelSpec("HuggingFaceTB/SmolLM2-135M-Instruct", 576, 1536, 30, 9, 3, 64)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (8, 16, 64)
BAR_OPEN_MS, BAR_DIGEST_MS = 12.0, 25.0


def _adapter(rank: int) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(rank)
    tensors = {}
    for layer in range(SMOLLM2.num_hidden_layers):
        for module in MODULES:
            in_f, out_f = SMOLLM2.projection_shape(module)
            tensors[lora_tensor_name(layer, module, "A")] = torch.randn(rank, in_f, generator=gen).bfloat16()
            tensors[lora_tensor_name(layer, module, "B")] = torch.randn(out_f, rank, generator=gen).bfloat16()
    return LoraConfig(rank, 2 * rank, tuple(sorted(MODULES))), tensors


def _times(fn: Callable[[], Any], repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def _interleaved(fns: list[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Time several functions in alternation, so a burst of load elsewhere on a shared
    machine hits them alike instead of skewing whichever happened to run then."""
    for fn in fns:
        fn()  # warm-up
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, out):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return out


def _p(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


def _phases(data: bytes, signer: Any, recipient: Any, repeats: int) -> dict[str, float]:
    """Each step of open_package timed alone (same public functions, same order)."""
    limits, trusted = Limits(), [signer.public_key()]
    sections = fmt.parse(data, limits)
    manifest = Manifest.from_bytes(sections.manifest)
    config = LoraConfig(manifest.rank, manifest.alpha, manifest.target_modules,
                               manifest.use_rslora)
    key = unwrap_data_key(sections.wrapped_key, recipient)

    def decrypt() -> torch.Tensor:
        buf = payload.allocate(sections.header.payload_length)
        AESGCM(key).decrypt_into(bytes(sections.nonce), sections.ciphertext_and_tag,
                                 sections.header_and_manifest, buf.numpy())
        return buf

    plain = decrypt()
    expected = {spec.name: spec for spec in manifest.tensors}
    steps: dict[str, Callable[[], Any]] = {
        "bounds": lambda: fmt.parse(data, limits),
        "signatures": lambda: find_verifying_signer(
            sections.header.signer_key_id.hex(), trusted, sections.signed_message(),
            sections.ed25519_sig, sections.mldsa65_sig),
        "manifest": lambda: Manifest.from_bytes(sections.manifest),
        "validate": lambda: validate_specs(config, manifest.tensors, SMOLLM2, limits),
        "unwrap": lambda: unwrap_data_key(sections.wrapped_key, recipient),
        "decrypt": decrypt,
        "digest": lambda: hashlib.sha256(plain.numpy()).hexdigest(),
        "parse": lambda: payload.decode(plain, expected, limits),
    }
    return {name: _p(_times(fn, repeats), 50) for name, fn in steps.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args(argv)
    # Opening runs no torch kernels; one thread keeps building the random adapters quick when
    # other processes hold the cores (torch's parallel copies stall then).
    torch.set_num_threads(1)
    signer, recipient = generate_signing_key(), generate_recipient_key()
    trusted = [signer.public_key()]
    result: dict[str, Any] = {
        "benchmark": "tssp_open", "base_model": SMOLLM2.model_id, "dtype": "bf16",
        "modules": list(MODULES), "repeats": args.repeats,
        "open_ms_p50": {}, "open_ms_p95": {}, "open_digest_ms_p50": {}, "open_digest_ms_p95": {},
        "payload_mb": {}, "package_bytes": {}, "pack_ms": {}, "open_mb_per_s": {},
        "open_digest_mb_per_s": {}, "phases_ms_p50": {}, "phase_mb_per_s": {},
    }
    for rank in RANKS:
        label = f"r{rank}"
        print(f"rank {rank}: packing", file=sys.stderr)
        start = time.perf_counter()
        data = pack(_adapter(rank), tenant="bench", name=label, version="1",
                    base_model=SMOLLM2.model_id, signer=signer, recipient=recipient.public_key(),
                    base_spec=SMOLLM2)
        result["pack_ms"][label] = round((time.perf_counter() - start) * 1e3, 1)
        mb = fmt.parse(data, Limits()).header.payload_length / 1e6

        def opener(digest: bool) -> Callable[[], Any]:
            return lambda: open_package(data, trusted_signers=trusted, recipient_keys=[recipient],
                                        base_model=SMOLLM2, verify_digest=digest)

        print(f"rank {rank}: opening ({mb:.1f} MB)", file=sys.stderr)
        plain, digest = _interleaved([opener(False), opener(True)], args.repeats)
        phases = _phases(data, signer, recipient, args.repeats)
        result["payload_mb"][label] = round(mb, 3)
        result["package_bytes"][label] = len(data)
        result["open_ms_p50"][label], result["open_ms_p95"][label] = _p(plain, 50), _p(plain, 95)
        result["open_digest_ms_p50"][label] = _p(digest, 50)
        result["open_digest_ms_p95"][label] = _p(digest, 95)
        result["open_mb_per_s"][label] = round(mb / (_p(plain, 50) / 1e3), 1)
        result["open_digest_mb_per_s"][label] = round(mb / (_p(digest, 50) / 1e3), 1)
        result["phases_ms_p50"][label] = phases
        result["phase_mb_per_s"][label] = {
            k: round(mb / (phases[k] / 1e3), 1) for k in ("decrypt", "digest", "parse")}
    result["bars"] = {"open_r16_p50_ms": BAR_OPEN_MS, "open_digest_r16_p50_ms": BAR_DIGEST_MS}
    result["meets_bars"] = (result["open_ms_p50"]["r16"] <= BAR_OPEN_MS
                            and result["open_digest_ms_p50"]["r16"] <= BAR_DIGEST_MS)
    result["env"] = {"python": platform.python_version(), "torch": torch.__version__,
                     "cryptography": cryptography.__version__, "machine": platform.machine()}
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
