"""Keeping torch's CPU parallelism on the step thread alone.

torch runs a parallel op on an OpenMP team that belongs to the thread that started it and lives
as long as that thread. With GNU OpenMP, once a process holds more team threads than it has
CPUs, every team stops spinning between parallel regions and sleeps on a futex instead: each
of a decode step's ~600 small parallel ops then pays a wake-up. One idle team left behind by
another long-lived thread (the one that loaded the model, an executor thread that parsed an
adapter, the router's encoder thread) made 32-row decode steps 40-50% slower on 2 cores.

So the engine builds itself on a thread that ends with the build (``run_apart``), and
long-lived helper threads in a process that runs an engine compute single-threaded
(``confine``, ``confined``): their torch ops run inline and never start a team.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

# the OpenMP runtimes torch builds link against, by the soname they are loaded under
_RUNTIMES = ("libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.dylib", "libiomp5.dylib")


def _loaded(name: str) -> ctypes.CDLL | None:
    """A library the process has already loaded (never a second copy: RTLD_NOLOAD)."""
    try:
        return ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LOCAL", 0))
    except OSError:
        return None


@functools.cache
def _runtime() -> tuple[ctypes.CDLL | None, ctypes.CDLL | None]:
    """The OpenMP runtime torch has loaded, and the library with MKL's thread-local control
    (torch's x86 builds link MKL statically), each if there is one."""
    omp = next((lib for lib in map(_loaded, _RUNTIMES) if lib is not None), None)
    if omp is not None:
        omp.omp_set_num_threads.argtypes = [ctypes.c_int]
        omp.omp_get_max_threads.restype = ctypes.c_int
    mkl = _loaded(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    if mkl is not None and hasattr(mkl, "MKL_Set_Num_Threads_Local"):
        mkl.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]
        mkl.MKL_Set_Num_Threads_Local.restype = ctypes.c_int
    else:
        mkl = None
    return omp, mkl


def gnu_openmp() -> bool:
    """Whether the OpenMP runtime in the process is GNU's (torch's on Linux): code built with
    GCC's -fopenmp then joins its teams instead of bringing a second runtime."""
    return _loaded("libgomp.so.1") is not None


def _set(threads: int) -> tuple[int, int]:
    """Set the calling thread's team size (OpenMP's, and MKL's for this thread: MKL follows a
    process-wide count once ``torch.set_num_threads`` was called); returns what to restore
    (0: nothing to restore)."""
    torch.get_num_threads()  # torch sets each thread's team size once, on its first parallel call
    omp, mkl = _runtime()
    before = 0
    if omp is not None:
        before = omp.omp_get_max_threads()
        omp.omp_set_num_threads(threads)
    mkl_before = mkl.MKL_Set_Num_Threads_Local(threads) if mkl is not None else 0
    return before, mkl_before


def confine() -> bool:
    """From now on, torch ops on the calling thread run on it alone (no OpenMP team). For the
    initializer of a long-lived helper thread; affects no other thread. False when torch runs
    without an OpenMP runtime that can be found (then nothing changes)."""
    return _set(1)[0] > 0


@contextlib.contextmanager
def confined(threads: int = 1) -> Iterator[None]:
    """The block's torch ops run on the calling thread alone (or on a team of ``threads``); its
    team size is restored after."""
    before, mkl_before = _set(threads)
    try:
        yield
    finally:
        omp, mkl = _runtime()
        if omp is not None and before != threads:
            omp.omp_set_num_threads(before)
        if mkl is not None:
            mkl.MKL_Set_Num_Threads_Local(mkl_before)  # 0: back to the process-wide count


def run_apart(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a thread of its own that ends with it, so the OpenMP team its torch ops start
    goes with it; blocks the caller and returns the result or raises what ``fn`` raised."""
    box: list = []

    def body() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value
