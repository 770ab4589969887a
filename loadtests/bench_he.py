"""HE-LoRA research mode, measured: key and ciphertext sizes, adapter encryption, one encrypted
delta (rank 8 and 16, SmolLM2's q_proj 576 -> 576 and v_proj 576 -> 192) through a real key
holder (``tensafe he key-holder`` on 127.0.0.1), greedy decoding cost per token with the HE
adapter on q_proj and v_proj of 1, 4 and 30 layers against the same loop with the plaintext
adapter, the largest CKKS error, and the server's least-squares attack on real activations.

    python -m loadtests.bench_he [--skip-30] [--attack-tokens 720]

Prints one JSON line; progress goes to stderr. Every figure is measured on this machine unless
its key says ``extrapolated`` (and the ``extrapolated`` list names them): the 30-layer figure
from the 1- and 4-layer ones (also measured, unless --skip-30), and an 8B model (4096 wide)
from a cost model fitted to the operations timed here. The CPU is shared: timings are indicative.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tenseal as ts
import torch

from adapters.lora import LoraConfig
from adapters.validate import lora_tensor_name
from engine import DEFAULT_MODEL, DeltaGenerator, default_cache_dir
from gateway.cli.he import capture_activations, he_hook, plaintext_hook
from privacy import attack, ckks
from privacy.adapter import EncryptedAdapter, HeLora, encrypt_adapter
from privacy.client import KeyHolderClient
from privacy.keyfiles import SECRET_FILE, SERVER_FILE, make_keys, read_context

SHAPES = {"q_proj": (576, 576), "v_proj": (576, 192)}
LAYERS = 30
TOKEN = "bench-he-token"
#: Llama-3-8B's shapes (hidden 4096, 8 KV heads of 128) for the extrapolation
SHAPES_8B = {"q_proj": (4096, 4096), "v_proj": (4096, 1024)}
LAYERS_8B = 32
ANCHORS = {
    "tenseal_ci_enc_vector_16x12_matmul_ms": 52,
    "enc_576_vector_by_plain_576x8_s_with_35MB_galois": 4.2,
    "moai_bert_base_pure_he_inference": "minutes per input",
}


def log(msg: str) -> None:
    print(f"[bench_he] {msg}", file=sys.stderr, flush=True)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def lora(rank: int, layers, seed: int = 0, std: float = 0.05) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for layer in layers:
        for m, (d_in, d_out) in SHAPES.items():
            t[lora_tensor_name(layer, m, "A")] = torch.randn(rank, d_in, generator=g) * std
            t[lora_tensor_name(layer, m, "B")] = torch.randn(d_out, rank, generator=g) * std
    return LoraConfig(rank, 2.0 * rank, tuple(sorted(SHAPES))), t


class KeyHolderProcess:
    def __init__(self, keys: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_")}
        env["TENSAFE_HE_TOKENS"] = TOKEN
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "he", "key-holder", "--keys", str(keys),
                                      "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the key holder did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---- sizes and unit costs ---------------------------------------------------------------------
def sizes_and_units(secret: ts.Context, server: ts.Context, keys: Path) -> dict:
    bare = len(server.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                                save_relin_keys=False))
    relin = len(ckks.server_context_bytes(server)) - bare
    sk = len(ckks.secret_context_bytes(secret)) - bare
    # reference: the same parameters with a public key and Galois keys (neither is made here)
    ref = ts.context(ts.SCHEME_TYPE.CKKS, ckks.POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(ckks.COEFF_MOD_BIT_SIZES),
                     n_threads=1)
    ref.global_scale = 2.0**ckks.SCALE_BITS
    no_keys = len(ref.serialize(save_public_key=False, save_galois_keys=False, save_relin_keys=False))
    public = len(ref.serialize(save_galois_keys=False, save_relin_keys=False)) - no_keys
    ref.generate_galois_keys()
    galois = len(ref.serialize(save_public_key=False, save_relin_keys=False)) - no_keys
    vec = np.random.default_rng(0).standard_normal(ckks.SLOTS) * 0.05
    fresh = ts.ckks_vector(secret, vec.tolist())
    fresh_s = ts.ckks_vector_from(server, fresh.serialize())
    prod = fresh_s * vec.tolist()
    sq = fresh_s * fresh_s
    rot_ref = ts.ckks_vector(ref, vec.tolist())
    units = {
        "encrypt_ms": median_ms(lambda: ts.ckks_vector(secret, vec.tolist()), 20),
        "decrypt_ms": median_ms(lambda: ts.ckks_vector_from(secret, prod.serialize()).decrypt(), 20),
        "ct_pt_ms": median_ms(lambda: fresh_s * vec.tolist(), 20),
        "ct_ct_relin_ms": median_ms(lambda: fresh_s * fresh_s, 20),
        "serialize_ms": median_ms(lambda: prod.serialize(), 20),
        "deserialize_ms": median_ms(lambda: ts.ckks_vector_from(server, prod.serialize()), 20),
        # TenSEAL's sum folds 4096 slots with log2(4096) = 12 rotations
        "rotation_ms": median_ms(lambda: rot_ref.sum(), 5) / math.log2(ckks.SLOTS),
    }
    return {
        "key_bytes": {"public": 0, "galois": 0, "relinearisation": relin, "secret": sk,
                      "public_if_asymmetric": public, "galois_if_generated": galois,
                      "server_context_file": (keys / SERVER_FILE).stat().st_size,
                      "secret_context_file": (keys / SECRET_FILE).stat().st_size},
        "ciphertext_bytes": {"fresh": len(fresh.serialize()), "after_ct_pt": len(prod.serialize()),
                             "after_ct_ct": len(sq.serialize())},
        "units_ms": {k: round(v, 3) for k, v in units.items()},
    }


def tenseal_mm_anchor(rank: int = 8) -> float:
    """The anchor's computation here: TenSEAL's own encrypted 576-vector x plain 576 x rank product."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, ckks.POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(ckks.COEFF_MOD_BIT_SIZES),
                     n_threads=1)
    ctx.global_scale = 2.0**ckks.SCALE_BITS
    ctx.generate_galois_keys()
    rng = np.random.default_rng(1)
    v = ts.ckks_vector(ctx, rng.standard_normal(576).tolist())
    m = rng.standard_normal((576, rank)).tolist()
    t0 = time.perf_counter()
    v.mm(m)
    return time.perf_counter() - t0


# ---- deltas ---------------------------------------------------------------------------------
def delta_costs(secret, server, url: str) -> tuple[dict, dict, dict, float]:
    x = np.random.default_rng(2).standard_normal((1, 576)) * 2.0
    delta_ms, breakdown, encrypt, worst = {}, {}, {}, 0.0
    with KeyHolderClient(url, TOKEN) as client:
        for rank in (8, 16):
            config, tensors = lora(rank, range(LAYERS), seed=rank)
            t0 = time.perf_counter()
            enc = encrypt_adapter(secret, config, tensors, {m: range(LAYERS) for m in SHAPES})
            encrypt_s = time.perf_counter() - t0
            blob = enc.serialize()
            plain_bytes = sum(t.numel() * 2 for t in tensors.values())  # as bf16
            encrypt[f"r{rank}"] = {"seconds": round(encrypt_s, 3), "bytes": len(blob), "plaintext_bf16_bytes": plain_bytes,
                                   "ciphertexts": sum(len(m.a) + len(m.b) for m in enc.modules.values())}
            adapter = EncryptedAdapter.load(server, blob)
            local = HeLora(adapter, ckks.KeyHolder(secret))
            remote = HeLora(adapter, client)
            delta_ms[f"r{rank}"], breakdown[f"r{rank}"] = {}, {}
            for module in SHAPES:
                a = tensors[lora_tensor_name(0, module, "A")].double().numpy()
                b = tensors[lora_tensor_name(0, module, "B")].double().numpy()
                want = config.scaling * (x @ a.T) @ b.T
                worst = max(worst, float(np.abs(remote.delta(0, module, x) - want).max() / np.abs(want).max()))
                before = remote.stats.server_s, remote.stats.key_holder_s
                n = 15
                http_ms = median_ms(lambda m=module: remote.delta(0, m, x), n)
                server_ms = 1e3 * (remote.stats.server_s - before[0]) / (n + 1)
                kh_ms = 1e3 * (remote.stats.key_holder_s - before[1]) / (n + 1)
                delta_ms[f"r{rank}"][module] = round(http_ms, 2)
                breakdown[f"r{rank}"][module] = {
                    "server_ms": round(server_ms, 2), "key_holder_round_trips_ms": round(kh_ms, 2),
                    "in_process_ms": round(median_ms(lambda m=module: local.delta(0, m, x), n), 2),
                    "ct_pt": adapter.modules[(0, module)].layout.a_ciphertexts,
                    "ct_ct": len(adapter.modules[(0, module)].layout.b_sizes), "rotations": 0}
                log(f"r{rank} {module}: {http_ms:.1f} ms per delta over HTTP")
    return delta_ms, breakdown, encrypt, worst


# ---- per-token generation cost -----------------------------------------------------------------
def step_seconds(gen: DeltaGenerator, ids: list[int], hook, targets, steps: int) -> float:
    """Median time of a decode step: between successive first-hook calls of decoded tokens."""
    marks: list[float] = []
    first = (min(targets["q_proj"]), "q_proj")

    def timed(layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
        if (layer, module) == first and x.shape[0] == 1:
            marks.append(time.perf_counter())
        return hook(layer, module, x)

    gen.greedy(ids, steps + 2, timed, targets, stop_at_eos=False)
    return statistics.median(np.diff(marks))


def per_token(gen: DeltaGenerator, secret, server, url: str, skip_30: bool) -> tuple[dict, dict, float, float]:
    ids = gen.tokenizer.tokenize(prompt="The quick brown fox")
    config, tensors = lora(8, range(LAYERS), seed=8)
    enc = EncryptedAdapter.load(server, encrypt_adapter(secret, config, tensors, {m: range(LAYERS) for m in SHAPES})
                                .serialize())
    reference = plaintext_hook(config, tensors)
    he_s, plain_ms, worst = {}, {}, 0.0
    with KeyHolderClient(url, TOKEN) as client:
        he = HeLora(enc, client)
        encrypted = he_hook(he)

        def compared(layer: int, module: str, x: torch.Tensor) -> torch.Tensor:
            nonlocal worst
            got, want = encrypted(layer, module, x), reference(layer, module, x.double())
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            return got

        for n in (1, 4, 30):
            targets = {m: list(range(n)) for m in SHAPES}
            plain_ms[f"layers_{n}"] = round(1e3 * step_seconds(gen, ids, reference, targets, 8), 2)
            if n == 30 and skip_30:
                continue
            he_s[f"layers_{n}"] = round(step_seconds(gen, ids, compared, targets, 3 if n == 30 else 5), 3)
            log(f"{n} layers: {he_s[f'layers_{n}']} s per token (HE), {plain_ms[f'layers_{n}']} ms (plaintext)")
    base_ms = 1e3 * step_seconds(gen, ids, lambda la, m, x: torch.zeros(x.shape[0], SHAPES[m][1]),
                                 {"q_proj": [0]}, 8)
    return he_s, plain_ms, worst, base_ms


# ---- the attack -------------------------------------------------------------------------------
def leak(gen: DeltaGenerator, secret, server, tokens: int, layer: int = 1, module: str = "q_proj",
         rank: int = 8, tensors: dict | None = None, config: LoraConfig | None = None) -> dict:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = gen.tokenizer.tokenize(prompt=text)
    held_out = 400
    x = capture_activations(gen, ids[: tokens + held_out], layer, module, chunk=256)
    x, x_test = x[:tokens], x[tokens:]
    if tensors is None:
        config, tensors = lora(rank, [layer], seed=99)
    assert config is not None
    enc = EncryptedAdapter.load(server, encrypt_adapter(secret, config, tensors, {module: [layer]}).serialize())
    t0 = time.perf_counter()
    deltas = HeLora(enc, ckks.KeyHolder(secret)).delta(layer, module, x)
    he_s = time.perf_counter() - t0
    a = tensors[lora_tensor_name(layer, module, "A")].double().numpy()
    b = tensors[lora_tensor_name(layer, module, "B")].double().numpy()
    w = config.scaling * a.T @ b.T
    r = config.rank
    ls = lambda n: attack.relative_error(attack.least_squares(x[:n], deltas[:n]), w)  # noqa: E731
    ranked = lambda n: attack.relative_error(attack.least_squares(x[:n], deltas[:n], r), w)  # noqa: E731
    effect = lambda n: attack.effect_error(attack.least_squares(x[:n], deltas[:n]), w, x_test)  # noqa: E731
    subspace = lambda n: attack.output_subspace_error(deltas[:n], w, r)  # noqa: E731
    n_ls = attack.tokens_to(ls, r, tokens)
    d_in, d_out = x.shape[1], deltas.shape[1]
    sv = np.linalg.svd(x, compute_uv=False)
    return {
        "layer": layer, "module": module, "rank": r, "d_in": d_in, "d_out": d_out, "tokens_observed": tokens,
        "tokens_to_1pct": n_ls, "rel_error_then": None if n_ls is None else round(ls(n_ls), 5),
        "rank_constrained_tokens_to_1pct": attack.tokens_to(ranked, r, tokens),
        "held_out_effect_tokens_to_1pct": attack.tokens_to(effect, r, tokens),
        "output_subspace_tokens_to_1pct": attack.tokens_to(subspace, r, tokens, 0.01),
        "rel_error_at": {str(n): round(ls(n), 4) for n in (r, d_in // 2, d_in * 3 // 4, d_in - 16, d_in, d_in + 16)
                         if n <= tokens},
        "lower_bound_dof_over_d_out": round(r * (d_in + d_out - r) / d_out, 1),
        "activations_condition_number": float(f"{sv[0] / sv[-1]:.3g}"),
        "activations_dims_for_99pct_energy": int(np.searchsorted(np.cumsum(sv**2) / np.sum(sv**2), 0.99) + 1),
        "he_deltas_s": round(he_s, 2),
    }


def trained_adapter_leak(gen, secret, server, tokens: int) -> dict | None:
    """The same attack on a trained adapter of the repository's demo tenant, when it is there."""
    from adapters.peft import read_peft_dir

    root = Path(__file__).resolve().parent.parent / "gateway" / "tenancy" / "demo" / "demo-support"
    try:
        config, tensors = read_peft_dir(root)
    except Exception as exc:  # noqa: BLE001 - optional figure
        log(f"no trained demo adapter ({exc})")
        return None
    if "q_proj" not in config.target_modules:
        return None
    out = leak(gen, secret, server, tokens, tensors={k: v.float() for k, v in tensors.items()}, config=config)
    out["adapter"] = "gateway/tenancy/demo/demo-support (trained)"
    return out


# ---- extrapolation ------------------------------------------------------------------------------
def cost_model(units: dict, ct_bytes: dict, rtt_ms: float, mb_ms: float, shapes: dict, rank: int) -> dict:
    """Per module and token: the server's products, the key holder's work, two round trips."""
    out = {}
    for module, (d_in, d_out) in shapes.items():
        layout = ckks.Layout(d_in, d_out, rank)
        a, b = layout.a_ciphertexts, len(layout.b_sizes)
        server = a * units["ct_pt_ms"] + b * (units["ct_ct_relin_ms"] + 2 * units["deserialize_ms"])
        key_holder = (1 + b) * (units["decrypt_ms"] + units["deserialize_ms"]) + b * units["encrypt_ms"]
        moved = (1 + 2 * b) * ct_bytes["after_ct_pt"] + b * ct_bytes["fresh"]
        transport = 2 * rtt_ms + moved / 2**20 * mb_ms
        out[module] = {"ms": round(server + key_holder + transport, 2), "ct_pt": a, "ct_ct": b,
                       "bytes_moved": moved}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-30", action="store_true", help="extrapolate 30 layers instead of also measuring them")
    p.add_argument("--attack-tokens", type=int, default=720)
    p.add_argument("--no-anchor", action="store_true", help="skip timing TenSEAL's own rotation-based mm (~4 s)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        make_keys(keys)
        secret, server = read_context(keys / SECRET_FILE, private=True), read_context(keys / SERVER_FILE, private=False)
        log("sizes and unit costs")
        result: dict = {"bench": "he", "parameters": ckks.PARAMETERS}
        result.update(sizes_and_units(secret, server, keys))
        kh = KeyHolderProcess(keys)
        try:
            with KeyHolderClient(kh.url, TOKEN) as c:
                tiny = ts.ckks_vector(secret, [1.0]).serialize()
                rtt_ms = median_ms(lambda: c.decrypt([tiny], 1, 1), 20) - result["units_ms"]["decrypt_ms"]
                big = [ts.ckks_vector(secret, [0.0] * ckks.SLOTS).serialize()] * 8
                mb = sum(map(len, big)) / 2**20
                mb_ms = (median_ms(lambda: c.decrypt(big, 1, ckks.SLOTS), 5) - rtt_ms
                         - 8 * (result["units_ms"]["decrypt_ms"] + result["units_ms"]["deserialize_ms"])) / mb
            result["transport"] = {"round_trip_ms": round(rtt_ms, 2), "ms_per_mib": round(max(mb_ms, 0.0), 2)}
            log("deltas")
            delta_ms, breakdown, encrypt, worst_delta = delta_costs(secret, server, kh.url)
            result["adapter_encryption"] = encrypt
            result["delta_ms"], result["delta_breakdown"] = delta_ms, breakdown
            log("per-token cost")
            gen = DeltaGenerator.load(DEFAULT_MODEL, default_cache_dir(), max_len=1024)
            he_s, plain_ms, worst_gen, base_ms = per_token(gen, secret, server, kh.url, args.skip_30)
        finally:
            kh.stop()
        per_layer = (he_s["layers_4"] - he_s["layers_1"]) / 3
        extrapolated_30 = round(he_s["layers_1"] + 29 * per_layer, 3)
        if "layers_30" not in he_s:
            he_s["layers_30"] = extrapolated_30
        result["per_token_s"] = he_s
        result["per_token_s_layers_30_extrapolated"] = extrapolated_30
        result["plaintext_per_token_ms"] = plain_ms
        result["base_model_per_token_ms"] = round(base_ms, 2)
        result["max_rel_error"] = float(f"{max(worst_delta, worst_gen):.3g}")
        log("attack")
        leaked = leak(gen, secret, server, args.attack_tokens)
        result["leak_tokens_to_1pct"] = leaked["tokens_to_1pct"]
        result["leak_rel_error"] = leaked["rel_error_then"]
        result["leak"] = leaked
        result["leak_trained_adapter"] = trained_adapter_leak(gen, secret, server, args.attack_tokens)
        units = result["units_ms"]
        modeled = cost_model(units, result["ciphertext_bytes"], rtt_ms, mb_ms, SHAPES, 8)
        big_model = cost_model(units, result["ciphertext_bytes"], rtt_ms, mb_ms, SHAPES_8B, 8)
        per_token_8b = LAYERS_8B * sum(m["ms"] for m in big_model.values()) / 1e3
        rot_layout = ckks.Layout(576, 576, 8)
        rotations = int(math.log2(rot_layout.rows) + math.ceil(math.log2(576)))
        result["rotation_variant_estimate"] = {
            "rotations_per_delta": rotations, "rotation_ms": units["rotation_ms"],
            "rotations_ms_q_proj_r8": round(rotations * units["rotation_ms"], 1),
            "galois_key_bytes": result["key_bytes"]["galois_if_generated"],
            "note": "one round trip instead of two, at log2(G) + log2(d_out) rotations and one more level"}
        result["extrapolation_8b"] = {
            "extrapolated": True, "model": "Llama-3-8B shapes: 4096 wide, q_proj 4096->4096, v_proj 4096->1024, "
                                           "32 layers, rank 8, the same parameters and packing",
            "cost_model_check_smollm2_r8_ms": {"modeled": {m: v["ms"] for m, v in modeled.items()},
                                              "measured": delta_ms["r8"]},
            "delta_ms": {m: v["ms"] for m, v in big_model.items()},
            "ciphertexts_per_delta": {m: {"ct_pt": v["ct_pt"], "ct_ct": v["ct_ct"]} for m, v in big_model.items()},
            "he_overhead_per_token_s_q_v_all_layers": round(per_token_8b, 2),
            "adapter_bytes_q_v_all_layers": LAYERS_8B * sum(
                (ckks.Layout(i, o, 8).a_ciphertexts + len(ckks.Layout(i, o, 8).b_sizes)) for i, o in SHAPES_8B.values())
                * result["ciphertext_bytes"]["fresh"],
            "leak_tokens_to_1pct": "about d_in = 4096 (the identifiability bound measured here at 576)",
        }
        if not args.no_anchor:
            log("anchor: TenSEAL's own encrypted-vector x plain-matrix product")
            result["anchors_measured_here"] = {"tenseal_enc_576_vector_mm_plain_576x8_s": round(tenseal_mm_anchor(), 2)}
        result["anchors"] = ANCHORS
        result["measured"] = ["key_bytes", "ciphertext_bytes", "units_ms", "transport", "adapter_encryption", "delta_ms",
                              "delta_breakdown", "per_token_s.layers_1", "per_token_s.layers_4",
                              *(["per_token_s.layers_30"] if not args.skip_30 else []), "plaintext_per_token_ms",
                              "base_model_per_token_ms", "max_rel_error", "leak", "leak_trained_adapter",
                              "rotation_variant_estimate.rotation_ms", "anchors_measured_here"]
        result["extrapolated"] = ["per_token_s_layers_30_extrapolated",
                                  *(["per_token_s.layers_30"] if args.skip_30 else []), "extrapolation_8b",
                                  "rotation_variant_estimate.rotations_ms_q_proj_r8"]
        result["env"] = {"python": platform.python_version(), "tenseal": ts.__version__, "torch": torch.__version__,
                         "cpus": os.cpu_count(), "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
