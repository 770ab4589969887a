"""Encrypted LoRA adapters (mode ``he``): encryption by the tenant, the file the server keeps,
and the server's per-module delta.

Only the chosen (layer, module) targets are encrypted and applied; the file records them, the
rank, alpha and the packing parameters, and holds the ciphertexts of A (``d_in x r``, PEFT's
``lora_A`` transposed) and B (``r x d_out``, PEFT's ``lora_B`` transposed, times the LoRA
scale) in the layouts ``privacy.ckks`` describes.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import tenseal as ts
import torch

from adapters.lora import LoraConfig
from adapters.validate import lora_tensor_name

from . import wire
from .ckks import PARAMETERS, CkksError, Layout, load_vector, stage_one, stage_two

FORMAT = "tensafe-he-lora"
VERSION = 1
MAX_FILE_CIPHERTEXTS = 1 << 16
#: tokens whose ciphertexts travel in one round trip (bounds the bodies: ~130 KB per token and ciphertext)
TOKENS_PER_ROUND_TRIP = 32


@dataclasses.dataclass
class EncryptedModule:
    layer: int
    module: str
    layout: Layout
    a: list[ts.CKKSVector]
    b: list[ts.CKKSVector]


@dataclasses.dataclass
class EncryptedAdapter:
    config: LoraConfig
    modules: dict[tuple[int, str], EncryptedModule]
    context: ts.Context  # the one its ciphertexts are linked to

    @property
    def targets(self) -> dict[str, list[int]]:
        """``{module: layers}`` of what is encrypted (the engine's DeltaLora takes this)."""
        out: dict[str, list[int]] = {}
        for layer, module in sorted(self.modules):
            out.setdefault(module, []).append(layer)
        return out

    def serialize(self) -> bytes:
        blobs: list[bytes] = []
        entries = []
        for (layer, module), m in sorted(self.modules.items()):
            entries.append({"layer": layer, "module": module, "d_in": m.layout.d_in, "d_out": m.layout.d_out,
                            "a": len(m.a), "b": len(m.b)})
            blobs += [ct.serialize() for ct in m.a] + [ct.serialize() for ct in m.b]
        header = {"format": FORMAT, "version": VERSION, "mode": "he", "parameters": PARAMETERS,
                  "rank": self.config.rank, "alpha": self.config.alpha, "use_rslora": self.config.use_rslora,
                  "target_modules": list(self.config.target_modules), "modules": entries}
        return wire.pack(header, blobs)

    @classmethod
    def load(cls, ctx: ts.Context, data: bytes) -> "EncryptedAdapter":
        """Read a file under the server's (or any) context of the same parameters."""
        header, blobs = wire.unpack(data, max_blobs=MAX_FILE_CIPHERTEXTS)
        if header.get("format") != FORMAT or header.get("version") != VERSION or header.get("mode") != "he":
            raise CkksError("not an encrypted (mode he) adapter file of this version")
        if header.get("parameters") != PARAMETERS:
            raise CkksError(f"encrypted under other parameters: {header.get('parameters')}")
        try:
            config = LoraConfig(int(header["rank"]), float(header["alpha"]), tuple(header["target_modules"]),
                                bool(header["use_rslora"]))
            modules = {}
            at = 0
            for e in header["modules"]:
                layout = Layout(int(e["d_in"]), int(e["d_out"]), config.rank)
                na, nb = int(e["a"]), int(e["b"])
                if na != layout.a_ciphertexts or nb != len(layout.b_sizes):
                    raise CkksError(f"layer {e['layer']} {e['module']}: {na} + {nb} ciphertexts do not fit its layout")
                cts = [load_vector(ctx, b) for b in blobs[at : at + na + nb]]
                at += na + nb
                modules[(int(e["layer"]), str(e["module"]))] = EncryptedModule(
                    int(e["layer"]), str(e["module"]), layout, cts[:na], cts[na:])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CkksError):
                raise
            raise CkksError(f"malformed encrypted adapter header: {exc!r}") from None
        if at != len(blobs):
            raise CkksError(f"{len(blobs) - at} ciphertexts in the file belong to no module")
        return cls(config, modules, ctx)


def encrypt_adapter(ctx: ts.Context, config: LoraConfig, tensors: Mapping[str, torch.Tensor],
                    targets: Mapping[str, Iterable[int]]) -> EncryptedAdapter:
    """Encrypt the (layer, module) pairs of ``targets`` (``{module: layers}``) of a PEFT adapter
    under the tenant's secret context."""
    if not ctx.is_private():
        raise CkksError("encrypting an adapter needs the tenant's secret context")
    modules = {}
    for module, layers in targets.items():
        if module not in config.target_modules:
            raise CkksError(f"{module} is not one of the adapter's target modules {list(config.target_modules)}")
        for layer in layers:
            try:
                a = tensors[lora_tensor_name(layer, module, "A")].double().numpy()  # [r, d_in]
                b = tensors[lora_tensor_name(layer, module, "B")].double().numpy()  # [d_out, r]
            except KeyError:
                raise CkksError(f"the adapter has no layer {layer} {module}") from None
            if a.shape[0] != config.rank or b.shape[1] != config.rank:
                raise CkksError(f"layer {layer} {module}: shapes {a.shape}, {b.shape} do not have rank {config.rank}")
            layout = Layout(a.shape[1], b.shape[0], config.rank)
            a_cts = [ts.ckks_vector(ctx, row.tolist()) for row in layout.a_slots(a.T)]
            b_cts = [ts.ckks_vector(ctx, part.tolist()) for part in layout.b_slots(config.scaling * b.T)]
            modules[(layer, module)] = EncryptedModule(layer, module, layout, a_cts, b_cts)
    if not modules:
        raise CkksError("no (layer, module) chosen to encrypt")
    return EncryptedAdapter(config, modules, ctx)


class KeyHolderLike(Protocol):
    """The key holder as the server reaches it: in-process (ckks.KeyHolder) or over HTTP
    (client.KeyHolderClient)."""

    def refresh(self, stage_ones: Sequence[bytes], rank: int, width: int) -> list[bytes]: ...

    def decrypt(self, stage_twos: Sequence[bytes], rank: int, width: int) -> np.ndarray: ...


@dataclasses.dataclass
class DeltaStats:
    calls: int = 0
    round_trips: int = 0
    tokens: int = 0
    server_s: float = 0.0  # stage 1, stage 2, (de)serialisation on the server
    key_holder_s: float = 0.0  # both round trips, as the server waits for them
    bytes_sent: int = 0
    bytes_received: int = 0


class HeLora:
    """The server's side: ``delta(layer, module, x)`` is the encrypted adapter's delta for the
    activation rows ``x [tokens, d_in]``, computed on ciphertexts and decrypted by the key holder
    (two round trips per call, for up to TOKENS_PER_ROUND_TRIP tokens)."""

    def __init__(self, adapter: EncryptedAdapter, key_holder: KeyHolderLike) -> None:
        self.adapter = adapter
        self.key_holder = key_holder
        self.stats = DeltaStats()

    def delta(self, layer: int, module: str, x: np.ndarray) -> np.ndarray:
        m = self.adapter.modules.get((layer, module))
        if m is None:
            raise KeyError(f"layer {layer} {module} is not encrypted in this adapter")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != m.layout.d_in:
            raise ValueError(f"activations of shape {x.shape}, expected [tokens, {m.layout.d_in}]")
        parts = [self._delta(m, x[i : i + TOKENS_PER_ROUND_TRIP]) for i in range(0, len(x), TOKENS_PER_ROUND_TRIP)]
        self.stats.calls += 1
        return np.concatenate(parts) if parts else np.zeros((0, m.layout.d_out))

    def _delta(self, m: EncryptedModule, x: np.ndarray) -> np.ndarray:
        rank, width = m.layout.rank, m.layout.d_out
        st = self.stats
        t0 = time.perf_counter()
        ones = [stage_one(m.layout, m.a, row).serialize() for row in x]
        t1 = time.perf_counter()
        refreshed = self.key_holder.refresh(ones, rank, width)
        t2 = time.perf_counter()
        per = len(m.b)
        if len(refreshed) != per * len(x):
            raise CkksError(f"the key holder sent {len(refreshed)} ciphertexts, expected {per * len(x)}")
        twos = []
        for t in range(len(x)):
            ys = [load_vector(self.adapter.context, b) for b in refreshed[t * per : (t + 1) * per]]
            twos += [ct.serialize() for ct in stage_two(m.b, ys)]
        t3 = time.perf_counter()
        delta = self.key_holder.decrypt(twos, rank, width)
        t4 = time.perf_counter()
        if delta.shape != (len(x), width):
            raise CkksError(f"the key holder sent deltas of shape {delta.shape}, expected {(len(x), width)}")
        st.round_trips += 2
        st.tokens += len(x)
        st.server_s += (t1 - t0) + (t3 - t2)
        st.key_holder_s += (t2 - t1) + (t4 - t3)
        st.bytes_sent += sum(map(len, ones)) + sum(map(len, twos))
        st.bytes_received += sum(map(len, refreshed)) + delta.nbytes
        return delta
