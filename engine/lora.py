"""Device-resident LoRA adapter slots and the per-batch heterogeneous LoRA computation.

Every adapter lives in one slot of stacked tensors, per target module, in PEFT's orientation:
``A[module]: [layers, slots, max_rank, in]`` and ``B[module]: [layers, slots, out, max_rank]``
(B pre-multiplied by the adapter's scaling, alpha/r or alpha/sqrt(r) for rsLoRA; smaller ranks
are zero-padded). An adapter is first *prepared*: validated once and laid out as a
:class:`StackedLora` (per module, its layers stacked in the slots' dtype), which is the form a CPU
cache should keep; loading it is then one strided copy per module and tensor kind, and only the
parts a previous occupant left non-zero are cleared. The base model is "no slot": its
rows get a zero LoRA delta.

For a batch, only the k distinct adapters the rows use are gathered, once per batch
composition, per fused projection group (q/k/v, o, gate/up, down): ``A: [k, m*r, in]`` (used
transposed) and a block-diagonal ``B: [k, m*r, out]`` (m = modules of the group some adapter
targets, r = the largest rank in the batch). Rows are grouped by adapter, so a projection's
LoRA delta is two batched matmuls whatever the mix, each row pays only for its own adapter, and
each adapter's weights are read once per step (not once per row, as a per-row gather would).
With many adapters in a batch, reading their weights is the cost: a group of several modules
then expands each module apart (no block-diagonal zeros read), and when every row has an
adapter of its own they are gathered in row order, so rows are neither gathered nor picked.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import torch

from .errors import AdapterExists, AdapterNotFound, AdapterRankTooLarge, AdapterSlotsFull, InvalidAdapter
from .model.weights import LlamaDims
from .threads import confined
from .types import LORA_TARGETS, AdapterConfig

#: Projection groups as the fused weights lay them out: group -> modules in output order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}

_COMPOSITIONS_KEPT = 4
_THIN_ROWS = 64  # a mixed forward pass of at most this many rows computes its LoRA in ``thin_dtype``
_THIN_ROWS_ONE = 4  # and one of a single adapter
#: from this many adapters in a batch, a group of several modules (q/k/v, gate/up) expands each
#: module apart: the block-diagonal B would read (m - 1) zeros for each value, and with many
#: adapters those reads cost more than the extra kernels
_SPLIT_ADAPTERS = 16
_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class LoraDeltas(Protocol):
    """What the forward pass asks of its LoRA inputs: add projection group ``group``'s delta at
    ``layer`` for the inputs ``x`` to ``out``. A LoraBatch is one; engine.delta has another."""

    def apply(self, group: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None: ...


@dataclasses.dataclass(frozen=True)
class GroupLora:
    a: torch.Tensor  # [layers, k, m*r, in]: the k adapters' A of the group's m modules, stacked
    # (used transposed: matmuls take the transposed view as is, and gathering stays row copies)
    b: torch.Tensor | None  # [layers, k, m*r, out_group]: block-diagonal B, scaling folded in
    #: instead of ``b``, for many adapters: per module (first output column, B [layers, k, r, out_m]),
    #: so each row's expand reads its modules' own B and none of the block-diagonal's zeros
    parts: tuple[tuple[int, torch.Tensor], ...] = ()


class LoraBatch:
    """The LoRA inputs of one forward pass.

    With one adapter in the batch, a projection's delta is two plain matmuls (rows on the base
    model masked to zero). With several, rows are grouped by adapter into a padded
    ``[k, g, hidden]`` block and the delta is two batched matmuls: every row only pays for its
    own adapter's rank, and each adapter's weights are read once per step.
    """

    def __init__(
        self, groups: Mapping[str, GroupLora], token_pos: Sequence[int], k: int, device: torch.device, dtype: torch.dtype,
        x_at: bool = False,
    ) -> None:
        self.groups = groups
        self.k = k
        #: the shrink of several adapters as x @ Aᵀ (else as (A @ xᵀ)ᵀ; see shrink_as_x_at)
        self.x_at = x_at
        n = len(token_pos)
        members: list[list[int]] = [[] for _ in range(k)]
        for row, p in enumerate(token_pos):
            if p >= 0:
                members[p].append(row)
        self.width = max(len(m) for m in members)
        self.row_mask: torch.Tensor | None = None
        if k == 1:
            if len(members[0]) < n:
                self.row_mask = torch.tensor([[float(p >= 0)] for p in token_pos], device=device, dtype=dtype)
            return
        gather, valid, dest = [], [], []
        for i, rows in enumerate(members):
            for j in range(self.width):
                if j < len(rows):
                    valid.append(i * self.width + j)
                    dest.append(rows[j])
                gather.append(rows[j] if j < len(rows) else rows[0])
        #: rows already in the padded order (each row its own adapter, the adapters gathered in
        #: row order): nothing to gather or pick
        self.in_order = gather == list(range(n))
        self.gather = torch.tensor(gather, device=device)
        self.dest = torch.tensor(dest, device=device)
        self.valid = None if len(valid) == len(gather) else torch.tensor(valid, device=device)
        # when every row uses an adapter, each row's delta is one row of the padded result:
        # picking those rows (a gather) and adding is much faster than a scatter-add
        self.pick: torch.Tensor | None = None
        if len(dest) == n:
            where = [0] * n
            for slot, row in zip(valid, dest, strict=True):
                where[row] = slot
            self.pick = torch.tensor(where, device=device)

    def apply(self, group: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None:
        g = self.groups.get(group)
        if g is None:
            return
        if self.k == 1:
            same = x.dtype == g.a.dtype
            xa = torch.mm(x if same else x.to(g.a.dtype), g.a[layer, 0].t())
            if self.row_mask is not None:
                xa.mul_(self.row_mask)
            if same:
                out.addmm_(xa, g.b[layer, 0])
            else:
                out.add_(torch.mm(xa, g.b[layer, 0]))  # in the output's dtype
            return
        xg = (x if self.in_order else x.index_select(0, self.gather)).view(self.k, self.width, -1)
        if xg.dtype != g.a.dtype:
            xg = xg.to(g.a.dtype)
        if self.x_at:
            xa = torch.bmm(xg, g.a[layer].transpose(1, 2))
        else:  # A @ x^T, transposed back as a view
            xa = torch.bmm(g.a[layer], xg.transpose(1, 2)).transpose(1, 2)
        if g.b is not None:
            self._add(out, torch.bmm(xa, g.b[layer]))
            return
        r = xa.shape[-1] // len(g.parts)
        for j, (col, b) in enumerate(g.parts):
            self._add(out[:, col : col + b.shape[-1]], torch.bmm(xa[:, :, j * r : (j + 1) * r], b[layer]))

    def _add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        """Add the padded ``[k, width, out]`` result's valid rows to their rows of ``out``."""
        y = y.view(self.k * self.width, -1)
        if self.in_order:
            out.add_(y)
            return
        if self.pick is not None:
            out.add_(y.index_select(0, self.pick))  # in the output's dtype
            return
        if self.valid is not None:
            y = y.index_select(0, self.valid)
        out.index_add_(0, self.dest, y.to(out.dtype))


@functools.lru_cache(maxsize=16384)
def _parse_name(name: str) -> tuple[int, str, str] | None:
    """(layer, module, "A"|"B") of a PEFT LoRA tensor name; adapters share names, so memoized."""
    m = _NAME.search(name)
    return None if m is None else (int(m.group(1)), m.group(2), m.group(3))


class StackedLora(Mapping[str, torch.Tensor]):
    """An adapter validated against the model and laid out the way the slots copy it fastest:
    per target module, its layers' ``A: [n, r, in]`` and ``B: [n, out, r]`` stacked in the slots'
    dtype (scaling not applied). As a mapping it still is the PEFT tensors, as views into the
    stacks, so it can stand wherever those are expected."""

    def __init__(
        self,
        dims: LlamaDims,
        dtype: torch.dtype,
        config: AdapterConfig,
        modules: dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]],
        names: dict[str, tuple[str, int, int]],
    ) -> None:
        self.dims = dims
        self.dtype = dtype
        self.config = config
        self.modules = modules  # module -> (layers, A stack, B stack)
        self._names = names  # PEFT name -> (module, index in the stacks, 0 for A / 1 for B)

    def __getitem__(self, name: str) -> torch.Tensor:
        module, i, which = self._names[name]
        return self.modules[module][1 + which][i]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for _, a, b in self.modules.values())


def shrink_as_x_at(hidden: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a mixed batch's shrink runs faster as ``x @ Aᵀ`` than as ``(A @ xᵀ)ᵀ`` here.

    The two are the same product, but which of them the CPU's BLAS does faster for these shapes
    (a few rows per adapter by rank 8-24) depends on the CPU: ``A @ xᵀ`` was 1.5x faster on an
    AVX512 EPYC, ``x @ Aᵀ`` 2-4x faster on an AMX Xeon (16 adapters x 2 rows 54 vs 22 µs, 64 x 1
    413 vs 111 µs). So both are timed once, on a mixed decode step's shapes, and the faster kept.
    Off the CPU: ``(A @ xᵀ)ᵀ``."""
    if device.type != "cpu":
        return False
    gen = torch.Generator().manual_seed(0)
    shapes = [(torch.randn((k, 24, hidden), generator=gen).to(dtype), torch.randn((k, w, hidden), generator=gen).to(dtype))
              for k, w in ((16, 2), (64, 1))]
    forms = {True: lambda a, x: torch.bmm(x, a.transpose(1, 2)), False: lambda a, x: torch.bmm(a, x.transpose(1, 2))}
    best = dict.fromkeys(forms, float("inf"))
    with torch.no_grad():
        for _ in range(4):  # the forms take turns; the best of each counts
            for form, fn in forms.items():
                t0 = time.perf_counter()
                for a, x in shapes:
                    fn(a, x)
                best[form] = min(best[form], time.perf_counter() - t0)
    return best[True] < best[False]


class LoraSlots:
    """Owner of the adapter slots. Loads and unloads may come from any thread; the step thread
    only reads slots that requests hold, and a slot's version changes on every load so batch
    compositions cached under an old version are never reused."""

    def __init__(self, dims: LlamaDims, slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dims = dims
        self.num_slots = slots
        self.max_rank = max_rank
        self.dtype = dtype
        #: the dtype of a thin mixed batch's gathered weights and LoRA matmuls: float32 on the
        #: CPU, where bf16 batched matmuls of these shapes (a few rows per adapter by rank
        #: 8-16) run 1.5-3x slower than float32 ones; prefill (many rows), one-adapter batches,
        #: the slots and prepared adapters stay in ``dtype``
        self.thin_dtype = torch.float32 if torch.device(device).type == "cpu" else dtype
        self.shrink_x_at = shrink_as_x_at(dims.hidden_size, self.thin_dtype, torch.device(device))
        L = dims.num_layers
        self.A = {}
        self.B = {}
        for module in LORA_TARGETS:
            fan_in, fan_out = dims.projection_shape(module)
            self.A[module] = torch.zeros((L, slots, max_rank, fan_in), dtype=dtype, device=device)
            self.B[module] = torch.zeros((L, slots, fan_out, max_rank), dtype=dtype, device=device)
        self._shapes = {m: dims.projection_shape(m) for m in LORA_TARGETS}
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}  # adapters requests may use
        self._reserved: dict[str, int] = {}  # slots being written
        self._rank = [0] * slots
        self._targets: list[frozenset[str]] = [frozenset()] * slots
        self._version = [0] * slots
        # per slot and module: (rank, layers) holding non-zero values, to clear on reuse
        self._dirty: list[dict[str, tuple[int, frozenset[int]]]] = [{} for _ in range(slots)]
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

    def version(self, slot: int) -> int:
        """Changes whenever the slot's contents change (prefix-cache keys depend on it)."""
        return self._version[slot]

    def free(self) -> int:
        with self._lock:
            return self.num_slots - len(self._ids) - len(self._reserved)

    @torch.no_grad()
    @confined()  # any thread, so never a team of its own beside the step thread's
    def prepare(self, adapter_id: str, tensors: Mapping[str, torch.Tensor], config: AdapterConfig) -> StackedLora:
        """Validate PEFT tensors and stack them per module in the slots' dtype, on the CPU
        (blocking; safe from any thread). A StackedLora prepared for these slots is returned as is."""
        if (isinstance(tensors, StackedLora) and tensors.dims == self.dims and tensors.dtype == self.dtype
                and tensors.config == config):
            if config.rank > self.max_rank:
                raise AdapterRankTooLarge(adapter_id, config.rank, self.max_rank)
            return tensors
        per_module = self._parse(adapter_id, tensors, config)
        r = config.rank
        layout = {m: (tuple(sorted(layers)), *self._shapes[m]) for m, layers in per_module.items()}
        # one allocation for all stacks: one mapping for the allocator, and few page faults
        buffer = torch.empty(sum(len(idx) * r * (i + o) for idx, i, o in layout.values()), dtype=self.dtype)
        modules: dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}
        offset = 0
        for module, (idx, fan_in, fan_out) in layout.items():
            n = len(idx) * r
            a = buffer[offset : offset + n * fan_in].view(len(idx), r, fan_in)
            b = buffer[offset + n * fan_in : offset + n * (fan_in + fan_out)].view(len(idx), fan_out, r)
            offset += n * (fan_in + fan_out)
            layers = per_module[module]
            torch._foreach_copy_(list(a.unbind(0)), [layers[i][0] for i in idx])
            torch._foreach_copy_(list(b.unbind(0)), [layers[i][1] for i in idx])
            modules[module] = (idx, a, b)
        position = {m: {layer: i for i, layer in enumerate(idx)} for m, (idx, _, _) in modules.items()}
        names = {}
        for name in tensors:
            layer, module, which = _parse_name(name)  # type: ignore[misc] - validated by _parse
            names[name] = (module, position[module][layer], 0 if which == "A" else 1)
        return StackedLora(self.dims, self.dtype, config, modules, names)

    def load(self, adapter_id: str, tensors: Mapping[str, torch.Tensor], config: AdapterConfig) -> int:
        """Prepare (if needed) and copy an adapter into a free slot, on the calling thread."""
        stacked = self.prepare(adapter_id, tensors, config)
        with self.loading(adapter_id, stacked) as slot:
            self.write(slot, stacked)
        return slot

    @contextlib.contextmanager
    def loading(self, adapter_id: str, stacked: StackedLora) -> Iterator[int]:
        """Reserve a slot for the block, which writes ``stacked`` into it (``write``, on
        whichever thread). Requests can use the adapter once the block ends; if the block
        raises, the slot is given back."""
        slot = self.reserve(adapter_id)
        try:
            yield slot
        except BaseException:
            self.abandon(adapter_id)
            raise
        self.commit(adapter_id, stacked)

    def reserve(self, adapter_id: str) -> int:
        """Claim a free slot for ``adapter_id``; requests cannot use it before ``commit``."""
        with self._lock:
            if adapter_id in self._ids or adapter_id in self._reserved:
                raise AdapterExists(adapter_id)
            used = set(self._ids.values()) | set(self._reserved.values())
            slot = next((s for s in range(self.num_slots) if s not in used), None)
            if slot is None:
                raise AdapterSlotsFull(adapter_id, self.num_slots)
            self._reserved[adapter_id] = slot
            self._version[slot] += 1
            return slot

    def commit(self, adapter_id: str, stacked: StackedLora) -> None:
        with self._lock:
            slot = self._reserved.pop(adapter_id)
            self._ids[adapter_id] = slot
            self._rank[slot] = stacked.config.rank
            self._targets[slot] = frozenset(stacked.modules)

    def abandon(self, adapter_id: str) -> None:
        """Give back a reserved slot whose write failed or was given up."""
        with self._lock:
            slot = self._reserved.pop(adapter_id, None)
            if slot is not None:
                self._version[slot] += 1

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
            parsed = _parse_name(name)
            if parsed is None:
                raise InvalidAdapter(f"adapter {adapter_id!r}: unexpected tensor {name!r}", adapter_id)
            layer, module, which = parsed
            if module not in config.target_modules:
                raise InvalidAdapter(f"adapter {adapter_id!r}: tensor {name!r} targets {module}, not in target_modules", adapter_id)
            if layer >= dims.num_layers:
                raise InvalidAdapter(f"adapter {adapter_id!r}: layer {layer} >= num_layers {dims.num_layers}", adapter_id)
            fan_in, fan_out = self._shapes[module]
            want = (config.rank, fan_in) if which == "A" else (fan_out, config.rank)
            if t.shape != want:
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
    def write(self, slot: int, stacked: StackedLora) -> None:
        """Copy into a reserved slot (blocking; the engine runs it on its step thread)."""
        r, scale = stacked.config.rank, stacked.config.scaling
        dirty = self._dirty[slot]
        for module in LORA_TARGETS:
            A, B = self.A[module], self.B[module]
            idx, a, b = stacked.modules.get(module, ((), None, None))
            old_rank, old_layers = dirty.pop(module, (0, frozenset()))
            # clear what the previous occupant left and this adapter does not overwrite
            for layer in old_layers:
                keep = r if layer in idx else 0
                if old_rank > keep:
                    A[layer, slot, keep:old_rank].zero_()
                    B[layer, slot, :, keep:old_rank].zero_()
            if not idx:
                continue
            a_dst, b_dst = A[:, slot, :r], B[:, slot, :, :r]
            if len(idx) == self.dims.num_layers:
                a_dst.copy_(a)
                if scale != 1.0 and b.device == b_dst.device:
                    torch.mul(b, scale, out=b_dst)  # scale while copying: one pass
                else:
                    b_dst.copy_(b)
                    if scale != 1.0:
                        b_dst.mul_(scale)
            else:
                index = torch.tensor(idx, device=A.device)
                a_dst.index_copy_(0, index, a.to(A.device))
                b_dst.index_copy_(0, index, (b * scale if scale != 1.0 else b).to(B.device))
            dirty[module] = (r, frozenset(idx))

    # ---- batching -----------------------------------------------------------------------
    def batch(self, token_slots: Sequence[int]) -> LoraBatch | None:
        """LoRA inputs for a forward pass whose token i uses slot ``token_slots[i]`` (-1 = base)."""
        distinct = sorted({s for s in token_slots if s >= 0})
        if not distinct:
            return None
        if len(distinct) == len(token_slots) > 1:
            # each row its own adapter: gathered in row order, so rows need no reordering
            distinct = list(token_slots)
        thin = len(token_slots) <= (_THIN_ROWS if len(distinct) > 1 else _THIN_ROWS_ONE)
        dtype = self.thin_dtype if thin else self.dtype
        with self._lock:
            key = (dtype, *((s, self._version[s]) for s in distinct))
            rank = max(self._rank[s] for s in distinct)
            targets = frozenset().union(*(self._targets[s] for s in distinct))
        groups = self._compositions.get(key)
        if groups is None:
            groups = self._compositions[key] = self._gather(distinct, rank, targets, dtype)
            while len(self._compositions) > _COMPOSITIONS_KEPT:
                self._compositions.popitem(last=False)
        else:
            self._compositions.move_to_end(key)
        pos = {s: i for i, s in enumerate(distinct)}
        return LoraBatch(groups, [pos.get(s, -1) for s in token_slots], len(distinct), self.A["q_proj"].device, dtype,
                         self.shrink_x_at)

    @torch.no_grad()
    def _gather(self, distinct: list[int], rank: int, targets: frozenset[str], dtype: torch.dtype
                ) -> dict[str, GroupLora]:
        device = self.A["q_proj"].device
        sel = torch.tensor(distinct, device=device)
        k, L = len(distinct), self.dims.num_layers
        groups: dict[str, GroupLora] = {}
        for group, modules in GROUPS.items():
            active = [m for m in modules if m in targets]
            if not active:
                continue
            outs = [self.dims.projection_shape(m)[1] for m in modules]
            # A[m]: [L, slots, max_rank, in] -> [L, k, rank, in], stacked over modules
            a = torch.cat([self.A[m][:, :, :rank].index_select(1, sel) for m in active], dim=2).to(dtype)
            if len(active) > 1 and k >= _SPLIT_ADAPTERS:
                parts = tuple((sum(outs[: modules.index(m)]),
                               self.B[m][..., :rank].index_select(1, sel).transpose(2, 3).to(dtype).contiguous())
                              for m in active)
                groups[group] = GroupLora(a=a, b=None, parts=parts)
                continue
            b = torch.zeros((L, k, len(active) * rank, sum(outs)), dtype=dtype, device=device)
            for j, m in enumerate(active):
                col = sum(outs[: modules.index(m)])
                b[:, :, j * rank : (j + 1) * rank, col : col + outs[modules.index(m)]] = (
                    self.B[m][..., :rank].index_select(1, sel).transpose(2, 3)
                )
            groups[group] = GroupLora(a=a, b=b)
        return groups
