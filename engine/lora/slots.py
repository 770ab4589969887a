"""Device-resident LoRA adapter slots.

Every adapter lives in one slot of stacked tensors, per target module: ``A[module]: [layers,
slots, max_rank, in]`` in PEFT's orientation and ``B[module]: [layers, slots, max_rank, out]``
(PEFT's transposed, so a slot's rank rows are each one contiguous output row; pre-multiplied
by the adapter's scaling, alpha/r or alpha/sqrt(r) for rsLoRA; smaller ranks are zero-padded).
The A of a projection group's modules (q/k/v, gate/up) are views into one tensor, ``[layers,
slots, m*max_rank, in]``, so one pass over a row's slot reads the group's shrink weights. An
adapter is first *prepared*: validated once and laid out as a :class:`StackedLora` (per module,
its layers stacked in the slots' dtype), which is the form a CPU cache should keep; loading it
is then one strided copy per module and tensor kind, and only the parts a previous occupant left
non-zero are cleared. The base model is "no slot": its rows get a zero LoRA delta.

A thin batch (up to 64 rows: a decode step, a short prompt's prefill), of one adapter or many,
computes its LoRA straight from these tables when the slot kernel is there
(engine.lora.native; the kernel form of engine.lora.batch). Otherwise only the k distinct
adapters the rows use are gathered, once per batch composition, per fused projection group:
``A: [k, m*r, in]`` (used transposed) and a block-diagonal ``B: [k, m*r, out]`` (m = modules of
the group some adapter targets, r = the largest rank in the batch). With many adapters in a
batch, a group of several modules then expands each module apart (no block-diagonal zeros
read), and when every row has an adapter of its own they are gathered in row order, so rows
are neither gathered nor picked.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import re
import threading
from collections.abc import Iterator, Mapping, Sequence

import torch

from ..errors import AdapterExists, AdapterNotFound, AdapterRankTooLarge, AdapterSlotsFull, InvalidAdapter
from ..model.weights import LlamaDims
from ..threads import confined
from ..types import LORA_TARGETS, AdapterConfig
from .batch import GROUPS, GroupLora, LoraBatch, SlotPlans, mixed_forms
from .native import SlotKernel, plan

_COMPOSITIONS_KEPT = 4
#: a forward pass of at most this many rows computes its LoRA with the slot kernel when there is
#: one, else (a mixed one) gathered in ``thin_dtype``
_THIN_ROWS = 64
_THIN_ROWS_ONE = 4  # and one of a single adapter
#: from this many adapters in a batch, a group of several modules (q/k/v, gate/up) expands each
#: module apart: the block-diagonal B would read (m - 1) zeros for each value, and with many
#: adapters those reads cost more than the extra kernels
_SPLIT_ADAPTERS = 16
_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


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


class LoraSlots:
    """Owner of the adapter slots. Loads and unloads may come from any thread; the step thread
    only reads slots that requests hold, and a slot's version changes on every load so batch
    compositions cached under an old version are never reused."""

    def __init__(self, dims: LlamaDims, slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dims = dims
        self.num_slots = slots
        self.max_rank = max_rank
        self.dtype = dtype
        #: the dtype of a thin batch's gathered weights and LoRA matmuls: float32 on the CPU,
        #: where bf16 batched matmuls of these shapes (a few rows per adapter by rank 8-16) run
        #: 1.5-3x slower than float32 ones; prefill (many rows), the slots and prepared adapters
        #: stay in ``dtype``
        self.thin_dtype = torch.float32 if torch.device(device).type == "cpu" else dtype
        #: the gathered form a thin batch of several adapters computes in without its kernel
        #: (timed here; see mixed_forms), and the one a wide batch does
        self.mixed_form = self.matmul_form = mixed_forms(dims.hidden_size, torch.device(device))[0]
        #: the kernel form's kernel (the engine sets it in eager mode on the CPU); None:
        #: gathered forms throughout
        self.native: SlotKernel | None = None
        self._plans: dict[frozenset[str], dict[str, SlotPlans]] = {}  # per set of targets
        L = dims.num_layers
        self.A = {}
        self.B = {}
        #: per group, its modules' A side by side: ``[L, slots, m*max_rank, in]``
        self.group_A: dict[str, torch.Tensor] = {}
        for group, modules in GROUPS.items():
            fan_in = dims.projection_shape(modules[0])[0]
            self.group_A[group] = torch.zeros((L, slots, len(modules) * max_rank, fan_in), dtype=dtype, device=device)
            for j, module in enumerate(modules):
                fan_out = dims.projection_shape(module)[1]
                self.A[module] = self.group_A[group][:, :, j * max_rank : (j + 1) * max_rank]
                self.B[module] = torch.zeros((L, slots, max_rank, fan_out), dtype=dtype, device=device)
        self._shapes = {m: dims.projection_shape(m) for m in LORA_TARGETS}
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}  # adapters requests may use
        self._reserved: dict[str, int] = {}  # slots being written
        self._rank = [0] * slots
        self._ranks = torch.zeros(slots, dtype=torch.int32)  # the same, for the slot kernel
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
            self._ranks[slot] = stacked.config.rank
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
            self._ranks[slot] = 0
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
                    B[layer, slot, keep:old_rank].zero_()
            if not idx:
                continue
            a_dst, b_dst = A[:, slot, :r], B[:, slot, :r]
            b = b.transpose(1, 2)  # [n, r, out]
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
        mixed = len(distinct) > 1
        thin = len(token_slots) <= (_THIN_ROWS if mixed else _THIN_ROWS_ONE)
        with self._lock:
            key_slots = tuple((s, self._version[s]) for s in distinct)
            rank = max(self._rank[s] for s in distinct)
            targets = frozenset().union(*(self._targets[s] for s in distinct))
        device = self.A["q_proj"].device
        if (len(token_slots) <= _THIN_ROWS and self.native is not None and self.native.supports(self.dtype)
                and device.type == "cpu"):  # one adapter or many: each row reads its own slot
            return LoraBatch({}, token_slots, len(distinct), device, self.dtype, "kernel", self._slot_groups(targets),
                             self.native, self._ranks)
        form = self.mixed_form if thin and mixed else self.matmul_form
        dtype = self.thin_dtype if thin else self.dtype
        key = (dtype, *key_slots)
        groups = self._compositions.get(key)
        if groups is None:
            groups = self._compositions[key] = self._gather(distinct, rank, targets, dtype)
            while len(self._compositions) > _COMPOSITIONS_KEPT:
                self._compositions.popitem(last=False)
        else:
            self._compositions.move_to_end(key)
        pos = {s: i for i, s in enumerate(distinct)}
        return LoraBatch(groups, [pos.get(s, -1) for s in token_slots], len(distinct), device, dtype, form)

    def _slot_groups(self, targets: frozenset[str]) -> dict[str, SlotPlans]:
        """The kernel form's groups for adapters targeting ``targets``: per group with an active
        module, its plan per layer (the tables are the slots' own, so plans are kept)."""
        groups = self._plans.get(targets)
        if groups is not None:
            return groups
        groups = {}
        R = self.max_rank
        for group, modules in GROUPS.items():
            active = [j for j, m in enumerate(modules) if m in targets]
            if not active:
                continue
            outs = [self.dims.projection_shape(m)[1] for m in modules]
            cols = [sum(outs[:j]) for j in active]
            groups[group] = tuple(
                plan([self.group_A[group][layer, :, j * R : (j + 1) * R] for j in active],
                     [self.B[modules[j]][layer] for j in active], cols)
                for layer in range(self.dims.num_layers))
        self._plans[targets] = groups
        return groups

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
            if len(active) == len(modules) and rank == self.max_rank:  # the group's A as the slots keep it
                a = self.group_A[group].index_select(1, sel).to(dtype)
            else:
                a = torch.cat([self.A[m][:, :, :rank].index_select(1, sel) for m in active], dim=2).to(dtype)
            if len(active) > 1 and k >= _SPLIT_ADAPTERS:
                parts = tuple((sum(outs[: modules.index(m)]), self.B[m][:, :, :rank].index_select(1, sel).to(dtype))
                              for m in active)
                groups[group] = GroupLora(a=a, b=None, parts=parts)
                continue
            b = torch.zeros((L, k, len(active) * rank, sum(outs)), dtype=dtype, device=device)
            for j, m in enumerate(active):
                col = sum(outs[: modules.index(m)])
                b[:, :, j * rank : (j + 1) * rank, col : col + outs[modules.index(m)]] = (
                    self.B[m][:, :, :rank].index_select(1, sel)
                )
            groups[group] = GroupLora(a=a, b=b)
        return groups
