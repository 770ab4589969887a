"""The slot kernel of a thin mixed batch's LoRA (``slot_lora.c`` beside this file), built for
the machine it runs on and loaded with ctypes.

A decode step with many adapters spends its LoRA reading their weights, a few KB per row and
module from scattered slots. torch has no op that reads each row's own adapter where it lies;
an inductor-generated loop did (about 40 µs of fixed cost per call, its loops at 9-14 GB/s),
this C kernel does it at about half the time: one call per projection group and layer, each
row's own rank only, the next rows' blocks prefetched (README, "The engine").

Built once per machine with the system's C compiler (``-O3 -march=native``, about 0.3 s) into
the engine's kernel cache, named by a hash of the source, the compiler and the CPU's flags, and
written under a temporary name first, so a crash never leaves a half-written library to load.
With GNU OpenMP (torch's own runtime on Linux) rows are split among the calling thread's
OpenMP team; with another runtime it is built serial rather than bring a second runtime into
the process (engine.threads). Checked against torch on random weights once loaded: a library
whose sums differ is not used. Without a compiler, none is built and the gathered forms serve.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..threads import gnu_openmp

log = logging.getLogger("tensafe.engine")

SOURCE = Path(__file__).with_name("slot_lora.c")
MAX_MODULES = 4
_DTYPES = {torch.bfloat16: "slot_lora_bf16", torch.float32: "slot_lora_f32"}
_P = ctypes.c_void_p


class Plan(ctypes.Structure):
    """One projection group at one layer, as ``plan_t`` in slot_lora.c lays it out."""

    _fields_ = [
        ("in_", ctypes.c_int32), ("modules", ctypes.c_int32), ("a_slot", ctypes.c_int64),
        ("a", _P * MAX_MODULES), ("b", _P * MAX_MODULES), ("b_slot", ctypes.c_int64 * MAX_MODULES),
        ("outs", ctypes.c_int32 * MAX_MODULES), ("cols", ctypes.c_int32 * MAX_MODULES),
    ]


class SlotKernel:
    """The loaded library's entry points: ``run(dtype)(n, x, x_stride, slots, ranks, plan, out,
    out_stride)``, every pointer an int."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self._fns = {}
        for dtype, name in _DTYPES.items():
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_int32, _P, ctypes.c_int64, _P, _P, _P, _P, ctypes.c_int64]
            fn.restype = None
            self._fns[dtype] = fn

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self._fns

    def run(self, dtype: torch.dtype):
        return self._fns[dtype]


def plan(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], cols: Sequence[int]) -> Plan:
    """A group's plan at one layer: its modules' ``A [slots, rank, in]`` (views into the
    group's fused A, sharing its slot stride) and ``B [slots, rank, out]``, and the first
    output column of each module's delta. The tensors must outlive the plan."""
    if not 0 < len(a) <= MAX_MODULES or len({len(a), len(b), len(cols)}) != 1:
        raise ValueError(f"a plan takes 1 to {MAX_MODULES} modules")
    p = Plan()
    p.in_ = a[0].shape[-1]
    p.modules = len(a)
    p.a_slot = a[0].stride(0)
    for j, (aj, bj, col) in enumerate(zip(a, b, cols, strict=True)):
        if aj.stride(0) != p.a_slot or aj.stride(2) != 1 or aj.stride(1) != p.in_ or not bj[0].is_contiguous():
            raise ValueError("slot tables must be slot-major with contiguous rows")
        p.a[j], p.b[j] = aj.data_ptr(), bj.data_ptr()
        p.b_slot[j], p.outs[j], p.cols[j] = bj.stride(0), bj.shape[-1], col
    return p


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def _flags(version: bytes) -> list[str]:
    """GNU OpenMP only where it is the runtime torch already loaded (the soname resolves to
    that copy) and the compiler (``version``: what its --version printed) is not clang;
    otherwise only the SIMD pragmas, serial across rows."""
    gomp = b"clang" not in version.lower() and gnu_openmp()
    return ["-O3", "-march=native", "-shared", "-fPIC", "-fopenmp" if gomp else "-fopenmp-simd"]


@functools.lru_cache(maxsize=4)  # per process and cache directory: the machine does not change
def load(cache_dir: Path) -> SlotKernel | None:
    """The kernel built for this machine under ``cache_dir`` (built there if missing), or None
    when there is no compiler or the build or its check fails (logged once)."""
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: thin batches' LoRA as matmuls over gathered weights")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
        flags = _flags(version)
        source = SOURCE.read_bytes()
        key = hashlib.sha256(b"\0".join([source, version, " ".join(flags).encode(), _cpu_flags().encode()]))
        path = cache_dir / f"slot_lora-{key.hexdigest()[:16]}.so"
        if not path.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".slot_lora-", suffix=".so")
            os.close(fd)
            try:
                done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                    raise RuntimeError(f"{cc} failed: {last}")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(path))
        if lib.slot_lora_plan_size() != ctypes.sizeof(Plan):
            raise RuntimeError("slot_lora.c and its ctypes mirror disagree on the plan's layout")
        kernel = SlotKernel(lib)
        _check(kernel)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the gathered forms in place
        log.warning("LoRA slot kernel unavailable, gathered forms used instead: %s", str(exc).splitlines()[0])
        return None
    return kernel


def delta(kernel: SlotKernel, x: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, p: Plan,
          out: torch.Tensor) -> None:
    """Add each row's LoRA delta of the plan's group to ``out`` (rows of ``x``; ``slots``
    int64, -1 for a row on the base model; ``ranks`` int32 per slot)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out.stride(-1) != 1 or out.dtype != x.dtype:
        raise ValueError("out must have contiguous rows in x's dtype")
    kernel.run(x.dtype)(x.shape[0], x.data_ptr(), x.stride(0), slots.data_ptr(), ranks.data_ptr(),
                        ctypes.addressof(p), out.data_ptr(), out.stride(0))


def _check(kernel: SlotKernel) -> None:
    """The kernel against torch on random slots: ranks 3 and 8 of 8, three modules of
    different widths, a row on the base model, in both dtypes."""
    gen = torch.Generator().manual_seed(0)
    for dtype in _DTYPES:
        slots, rank, fan_in, outs = 4, 8, 40, (24, 8, 8)
        a = torch.randn((slots, len(outs) * rank, fan_in), generator=gen).to(dtype)
        b = [torch.randn((slots, rank, o), generator=gen).to(dtype) for o in outs]
        ranks = torch.tensor([8, 3, 8, 0], dtype=torch.int32)
        for s in range(slots):  # rows past a slot's rank are zero, as the slots keep them
            for j in range(len(outs)):
                a[s, j * rank + int(ranks[s]) : (j + 1) * rank] = 0
                b[j][s, int(ranks[s]) :] = 0
        cols = (0, 24, 32)
        p = plan([a[:, j * rank : (j + 1) * rank] for j in range(len(outs))], b, cols)
        x = torch.randn((5, fan_in), generator=gen).to(dtype)
        row_slots = torch.tensor([2, -1, 0, 1, 2])
        out = torch.randn((5, sum(outs)), generator=gen).to(dtype)
        want = out.float().clone()
        for i, s in enumerate(row_slots.tolist()):
            if s >= 0:
                xa = a[s].float() @ x[i].float()
                want[i] += torch.cat([xa[j * rank : (j + 1) * rank] @ b[j][s].float() for j in range(len(outs))])
        delta(kernel, x, row_slots, ranks, p, out)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        if not torch.allclose(out.float(), want, rtol=tol, atol=tol * 10):
            raise RuntimeError(f"its {dtype} sums differ from torch's by {(out.float() - want).abs().max().item():.3g}")
