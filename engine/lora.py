"""Device-resident LoRA adapter slots and the per-batch heterogeneous LoRA computation.

Every adapter lives in one slot of stacked tensors, per target module:
``A[module]: [layers, in, slots, max_rank]`` and ``B[module]: [layers, slots, max_rank, out]``
(B pre-multiplied by the adapter's scaling, alpha/r or alpha/sqrt(r) for rsLoRA; smaller ranks
are zero-padded). The base model is "no slot": its rows get a zero LoRA delta.

For a batch, only the k distinct adapters the rows use are gathered, once per batch
composition, into a dense ``A_cat: [in, m*k*r]`` and a block-diagonal ``B_blk: [m*k*r, out]`` per
fused projection group (m = modules of the group some adapter targets, r = the largest rank in
the batch). A decoder-layer projection then costs three kernels however many adapters the
batch mixes: ``out += ((x @ A_cat) * row_mask) @ B_blk``. Weights are read once per step, not
once per row as with a per-row gather.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import threading
from collections.abc import Mapping, Sequence

import torch

from .errors import AdapterExists, AdapterNotFound, AdapterRankTooLarge, AdapterSlotsFull, InvalidAdapter
from .model.weights import LlamaDims
from .types import LORA_TARGETS, AdapterConfig

#: Projection groups as the fused weights lay them out: group -> modules in output order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}

_COMPOSITIONS_KEPT = 4
_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclasses.dataclass(frozen=True)
class GroupLora:
    a_cat: torch.Tensor  # [layers, in, m*k*r]
    b_blk: torch.Tensor  # [layers, m*k*r, out_group]
    modules: int  # m


class LoraBatch:
    """The LoRA inputs of one forward pass: per-group weights and the per-token row mask."""

    def __init__(self, groups: Mapping[str, GroupLora], mask: torch.Tensor) -> None:
        self.groups = groups
        self._mask = mask  # [N, k*r]
        self._masks: dict[int, torch.Tensor] = {}

    def apply(self, group: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        g = self.groups.get(group)
        if g is None:
            return
        mask = self._masks.get(g.modules)
        if mask is None:
            mask = self._mask if g.modules == 1 else self._mask.repeat(1, g.modules)
            self._masks[g.modules] = mask
        xa = torch.mm(x, g.a_cat[layer])
        xa.mul_(mask)
        out.addmm_(xa, g.b_blk[layer])


class LoraSlots:
    """Owner of the adapter slots. Loads and unloads may come from any thread; the step thread
    only reads slots that requests hold, and a slot's version changes on every load so batch
    compositions cached under an old version are never reused."""

    def __init__(self, dims: LlamaDims, slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dims = dims
        self.num_slots = slots
        self.max_rank = max_rank
        self.dtype = dtype
        L = dims.num_layers
        self.A = {}
        self.B = {}
        for module in LORA_TARGETS:
            fan_in, fan_out = dims.projection_shape(module)
            self.A[module] = torch.zeros((L, fan_in, slots, max_rank), dtype=dtype, device=device)
            self.B[module] = torch.zeros((L, slots, max_rank, fan_out), dtype=dtype, device=device)
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._rank = [0] * slots
        self._targets: list[frozenset[str]] = [frozenset()] * slots
        self._version = [0] * slots
        # Recent batch compositions -> gathered weights (prefill and decode alternate).
        self._compositions: collections.OrderedDict[tuple, dict[str, GroupLora]] = collections.OrderedDict()

    # ---- management -------------------------------------------------------------------
    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    def slot_of(self, adapter_id: str) -> int:
        with self._lock:
            try:
                return self._ids[adapter_id]
            except KeyError:
                raise AdapterNotFound(adapter_id) from None

    def free(self) -> int:
        with self._lock:
            return self.num_slots - len(self._ids)

    def load(self, adapter_id: str, tensors: Mapping[str, torch.Tensor], config: AdapterConfig) -> int:
        per_module = self._parse(adapter_id, tensors, config)
        with self._lock:
            if adapter_id in self._ids:
                raise AdapterExists(adapter_id)
            used = set(self._ids.values())
            slot = next((s for s in range(self.num_slots) if s not in used), None)
            if slot is None:
                raise AdapterSlotsFull(adapter_id, self.num_slots)
            self._ids[adapter_id] = slot  # reserved; not visible to requests until written
            self._version[slot] += 1
        try:
            self._write(slot, per_module, config)
        except BaseException:
            with self._lock:
                del self._ids[adapter_id]
            raise
        with self._lock:
            self._rank[slot] = config.rank
            self._targets[slot] = frozenset(per_module)
        return slot

    def unload(self, adapter_id: str) -> None:
        with self._lock:
            slot = self._ids.pop(adapter_id, None)
            if slot is None:
                raise AdapterNotFound(adapter_id)
            self._version[slot] += 1
            self._rank[slot] = 0
            self._targets[slot] = frozenset()

    def _parse(
        self, adapter_id: str, tensors: Mapping[str, torch.Tensor], config: AdapterConfig
    ) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        dims = self.dims
        if config.rank < 1:
            raise InvalidAdapter(f"adapter {adapter_id!r}: rank must be >= 1, got {config.rank}", adapter_id)
        if config.rank > self.max_rank:
            raise AdapterRankTooLarge(adapter_id, config.rank, self.max_rank)
        unknown = set(config.target_modules) - set(LORA_TARGETS)
        if unknown:
            raise InvalidAdapter(f"adapter {adapter_id!r}: unsupported target modules {sorted(unknown)}", adapter_id)
        found: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            m = _NAME.search(name)
            if m is None:
                raise InvalidAdapter(f"adapter {adapter_id!r}: unexpected tensor {name!r}", adapter_id)
            layer, module, which = int(m.group(1)), m.group(2), m.group(3)
            if module not in config.target_modules:
                raise InvalidAdapter(f"adapter {adapter_id!r}: tensor {name!r} targets {module}, not in target_modules", adapter_id)
            if layer >= dims.num_layers:
                raise InvalidAdapter(f"adapter {adapter_id!r}: layer {layer} >= num_layers {dims.num_layers}", adapter_id)
            fan_in, fan_out = dims.projection_shape(module)
            want = (config.rank, fan_in) if which == "A" else (fan_out, config.rank)
            if tuple(t.shape) != want:
                raise InvalidAdapter(
                    f"adapter {adapter_id!r}: {name} has shape {tuple(t.shape)}, expected {want}", adapter_id
                )
            found.setdefault((module, layer), {})[which] = t
        per_module: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (module, layer), pair in found.items():
            if set(pair) != {"A", "B"}:
                raise InvalidAdapter(f"adapter {adapter_id!r}: layer {layer} {module} lacks lora_A or lora_B", adapter_id)
            per_module.setdefault(module, {})[layer] = (pair["A"], pair["B"])
        if not per_module:
            raise InvalidAdapter(f"adapter {adapter_id!r}: no LoRA tensors", adapter_id)
        return per_module

    @torch.no_grad()
    def _write(self, slot: int, per_module: dict, config: AdapterConfig) -> None:
        r, scale = config.rank, config.scaling
        for module in LORA_TARGETS:
            a_dst = self.A[module][:, :, slot, :]  # [L, in, max_rank]
            b_dst = self.B[module][:, slot, :, :]  # [L, max_rank, out]
            layers = per_module.get(module)
            a_dst.zero_()
            b_dst.zero_()
            if not layers:
                continue
            idx = sorted(layers)
            a = torch.stack([layers[i][0].t() for i in idx]).to(self.dtype)  # [n, in, r]
            b = torch.stack([layers[i][1].t() for i in idx]).to(torch.float32).mul_(scale).to(self.dtype)
            if len(idx) == self.dims.num_layers:
                a_dst[:, :, :r].copy_(a)
                b_dst[:, :r, :].copy_(b)
            else:
                sel = torch.tensor(idx, device=a_dst.device)
                a_dst[:, :, :r].index_copy_(0, sel, a.to(a_dst.device))
                b_dst[:, :r, :].index_copy_(0, sel, b.to(b_dst.device))

    # ---- batching -----------------------------------------------------------------------
    def batch(self, token_slots: Sequence[int]) -> LoraBatch | None:
        """LoRA inputs for a forward pass whose token i uses slot ``token_slots[i]`` (-1 = base)."""
        distinct = sorted({s for s in token_slots if s >= 0})
        if not distinct:
            return None
        with self._lock:
            key = tuple((s, self._version[s]) for s in distinct)
            rank = max(self._rank[s] for s in distinct)
            targets = frozenset().union(*(self._targets[s] for s in distinct))
        groups = self._compositions.get(key)
        if groups is None:
            groups = self._compositions[key] = self._gather(distinct, rank, targets)
            while len(self._compositions) > _COMPOSITIONS_KEPT:
                self._compositions.popitem(last=False)
        else:
            self._compositions.move_to_end(key)
        k = len(distinct)
        device = self.A["q_proj"].device
        pos = {s: i for i, s in enumerate(distinct)}
        row = torch.tensor([pos.get(s, -1) for s in token_slots], device=device)
        onehot = row[:, None] == torch.arange(k, device=device)[None, :]
        mask = onehot.to(self.dtype).repeat_interleave(rank, dim=1)  # [N, k*rank]
        return LoraBatch(groups, mask)

    @torch.no_grad()
    def _gather(self, distinct: list[int], rank: int, targets: frozenset[str]) -> dict[str, GroupLora]:
        device = self.A["q_proj"].device
        sel = torch.tensor(distinct, device=device)
        k = len(distinct)
        groups: dict[str, GroupLora] = {}
        for group, modules in GROUPS.items():
            active = [m for m in modules if m in targets]
            if not active:
                continue
            outs = [self.dims.projection_shape(m)[1] for m in modules]
            L = self.dims.num_layers
            a_parts = [
                self.A[m].index_select(2, sel)[..., :rank].reshape(L, -1, k * rank) for m in active
            ]
            a_cat = torch.cat(a_parts, dim=2) if len(a_parts) > 1 else a_parts[0].contiguous()
            b_blk = torch.zeros((L, len(active) * k * rank, sum(outs)), dtype=self.dtype, device=device)
            for j, m in enumerate(active):
                col = sum(outs[: modules.index(m)])
                b = self.B[m].index_select(1, sel)[:, :, :rank, :].reshape(L, k * rank, -1)
                b_blk[:, j * k * rank : (j + 1) * k * rank, col : col + b.shape[-1]] = b
            groups[group] = GroupLora(a_cat=a_cat, b_blk=b_blk, modules=len(active))
        return groups
