"""One forward pass's LoRA computation over a batch of rows on one adapter or several.

A projection's LoRA delta is a shrink (``x @ Aᵀ``, rank-wide) and an expand (``· @ Bᵀ``) per
row, each row with its own adapter's weights, per fused projection group (q/k/v, o, gate/up,
down). A batch computes them in one of three *forms*:

- ``"kernel"`` (a thin batch, up to 64 rows: decode steps, short prefills): straight from the
  slot tables, with no gather: a C kernel (``slot_lora.c``, engine.lora.native) reads each row's own adapter rows where the
  slots keep them, in their own dtype, sums in float32 and adds into the projection's output,
  one call per group and layer. With many adapters in a step, reading their weights is the
  cost of its LoRA, and gathering them first cost as much again on every change of the
  batch's composition; with one adapter, decode steps are still 6-14% faster than with two
  plain matmuls.
- ``"x_at"`` and ``"a_xt"`` (a wide batch of several adapters, and a thin one without the
  kernel): the k distinct adapters the rows use gathered (by LoraSlots, once per batch
  composition), rows grouped by adapter into a padded ``[k, width, in]`` block and two batched
  matmuls; each adapter's weights are read once per pass. The two name the shrink's orientation
  (``x @ Aᵀ`` or ``(A @ xᵀ)ᵀ``): the same product, but which the CPU's BLAS does faster for these
  shapes depends on the CPU (``mixed_forms`` times them once).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from .native import Plan, SlotKernel, delta

#: Projection groups as the fused weights lay them out: group -> modules in output order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}

#: the forms of a batch's LoRA computed from gathered weights (the kernel's is "kernel")
FORMS = ("x_at", "a_xt")


class LoraDeltas(Protocol):
    """What the forward pass asks of its LoRA inputs: add projection group ``group``'s delta at
    ``layer`` for the inputs ``x`` to ``out``. A LoraBatch is one; engine.delta has another."""

    def apply(self, group: str, layer: int, x: torch.Tensor, out: torch.Tensor) -> None: ...


@dataclasses.dataclass(frozen=True)
class GroupLora:
    #: the k adapters' A of the group's m modules, stacked: ``[layers, k, m*r, in]`` (used
    #: transposed: matmuls take the transposed view as is, and gathering stays row copies)
    a: torch.Tensor
    b: torch.Tensor | None  # [layers, k, m*r, out_group]: block-diagonal B, scaling folded in
    #: instead of ``b``, for many adapters: per module (first output column, B [layers, k, r,
    #: out_m]), so each row's expand reads its modules' own B and none of the block-diagonal's zeros
    parts: tuple[tuple[int, torch.Tensor], ...] = ()


#: a group's LoRA for the kernel form: its plan per layer (the slot tables of the group's
#: active modules, and where each one's delta goes in the group's output)
SlotPlans = tuple[Plan, ...]


class LoraBatch:
    """The LoRA inputs of one forward pass.

    In the kernel form, every projection's delta comes from ``slot_groups`` through ``kernel``
    (``ranks``: the slots' ranks, ``[slots]`` int32, so each row reads its own rank). Otherwise, with one
    adapter in the batch, it is two plain matmuls (rows on the base model masked to zero); with
    several, it is computed in the batch's gathered ``form`` from ``groups`` (see the module's
    docstring). In every form each row only pays for its own adapter's rank.
    """

    def __init__(
        self, groups: Mapping[str, GroupLora], token_pos: Sequence[int], k: int, device: torch.device, dtype: torch.dtype,
        form: str = "a_xt", slot_groups: Mapping[str, SlotPlans] | None = None, kernel: SlotKernel | None = None,
        ranks: torch.Tensor | None = None,
    ) -> None:
        if form not in (*FORMS, "kernel"):
            raise ValueError(f"unknown form {form!r}")
        self.groups = groups
        self.k = k
        self.form = form
        n = len(token_pos)
        self.row_mask: torch.Tensor | None = None
        if form == "kernel":
            # token_pos are the rows' slots here (-1: base, which the kernel skips)
            if kernel is None or ranks is None:
                raise ValueError("the kernel form needs the slot kernel and the slots' ranks")
            self.slot_groups = slot_groups or {}
            self._kernel, self._ranks = kernel, ranks
            self._slots = torch.tensor(token_pos, dtype=torch.int64, device=device)
            return
        if any(p < 0 for p in token_pos) and k == 1:
            self.row_mask = torch.tensor([[float(p >= 0)] for p in token_pos], device=device, dtype=dtype)
        if k == 1:
            return
        members: list[list[int]] = [[] for _ in range(k)]
        for row, p in enumerate(token_pos):
            if p >= 0:
                members[p].append(row)
        self.width = max(len(m) for m in members)
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
        if self.form == "kernel":
            plans = self.slot_groups.get(group)
            if plans is not None:
                delta(self._kernel, x, self._slots, self._ranks, plans[layer], out)
            return
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
        if self.form == "x_at":
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


@functools.lru_cache(maxsize=8)  # per process: the machine does not change
def mixed_forms(hidden: int, device: torch.device) -> list[str]:
    """The gathered forms of a thin mixed batch's LoRA, fastest here first.

    Which is fastest depends on the CPU: ``(A @ xᵀ)ᵀ`` was 1.5x faster than ``x @ Aᵀ`` on an
    AVX512 EPYC, ``x @ Aᵀ`` 2-4x faster on an AMX Xeon (16 adapters x 2 rows 54 vs 22 µs, 64 x 1
    413 vs 111 µs). So the two are timed once on a mixed decode step's shapes (16 adapters x 2
    rows and 64 x 1, one q/v group of rank 16, in float32 as thin batches run). Off the CPU:
    ``"a_xt"`` first, untimed."""
    device = torch.device(device)
    if device.type != "cpu":
        return ["a_xt", "x_at"]
    return _fastest(_probes(hidden, device))


def _probes(hidden: int, device: torch.device) -> list[tuple[str, Callable[[], None]]]:
    gen = torch.Generator().manual_seed(0)
    cases = []
    for k, w in ((16, 2), (64, 1)):
        a = torch.randn((k, 32, hidden), generator=gen)
        b = [torch.randn((k, 16, hidden), generator=gen), torch.randn((k, 16, hidden // 3), generator=gen)]
        x = torch.randn((k * w, hidden), generator=gen)
        out = torch.zeros((k * w, hidden + hidden // 3))
        token_pos = [row // w for row in range(k * w)]
        group = GroupLora(a=a[None], b=None, parts=((0, b[0][None]), (hidden, b[1][None])))
        for form in FORMS:
            batch = LoraBatch({"qkv": group}, token_pos, k, device, torch.float32, form)
            cases.append((form, lambda batch=batch, x=x, out=out: batch.apply("qkv", 0, x, out)))
    return cases


def _fastest(cases: list[tuple[str, Callable[[], None]]]) -> list[str]:
    """The forms by the time their cases take, least first (best of four rounds in turn)."""
    best: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(4):
            took: dict[str, float] = {}
            for form, run in cases:
                t0 = time.perf_counter()
                run()
                took[form] = took.get(form, 0.0) + time.perf_counter() - t0
            for form, t in took.items():
                best[form] = min(best.get(form, float("inf")), t)
    return sorted(best, key=best.__getitem__)
