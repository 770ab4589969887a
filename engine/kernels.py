"""Kernels torch.compile builds in the background while the engine serves in eager mode.

Compilation takes seconds, so it never happens on the step thread: the first step that could
use a kernel asks for it and runs its eager version meanwhile; a helper thread compiles it
(torch keeps the result on disk, so a restart finds it in about a second) and later steps use
it. A kernel is compiled for the step thread's team size and in inference mode, with the sizes
its caller names left dynamic, so the step thread never meets a guard that fails and
recompiles. Without a C++ compiler the kernels are off from the start; a compilation that
fails is logged once and turns them off; either way eager stays.

The decode attention is one: SDPA's CPU flash kernel spends most of a decode step's attention
time on overhead for a few query heads per KV head; the compiled version reads each cached key
and value row once per step, in a single fused loop: 32-row decode steps 6-19% faster here
(README, "The engine").
"""
from __future__ import annotations

import collections
import itertools
import logging
import shutil
import threading
import types
from collections.abc import Callable, Sequence

import torch

from .threads import confined

log = logging.getLogger("tensafe.engine")

Kernel = Callable[..., torch.Tensor]
_serial = itertools.count()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new token per row over its cached keys, in float32.

    ``q: [n, kv_heads, group, head_dim]`` (a KV head's query heads side by side), ``k, v: [n,
    kv_heads, ctx, head_dim]``, ``bias: [n, 1, 1, ctx]`` (0, or -inf past a row's position).
    Written as products and sums, not matmuls, so the compiler fuses each into one loop."""
    s = (q.float().unsqueeze(3) * k.float().unsqueeze(2)).sum(-1) * scale + bias  # [n, kv, group, ctx]
    p = torch.softmax(s, dim=-1)
    return (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2).to(q.dtype)


class BackgroundKernels:
    """Compiled versions of functions, by key, compiled one at a time on a helper thread."""

    def __init__(self, enabled: bool = True) -> None:
        #: torch's C++ backend needs a compiler at run time
        self.enabled = enabled and any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))
        if enabled and not self.enabled:
            log.info("no C++ compiler found: compiled kernels off, eager kernels throughout")
        self._ready: dict[tuple, Kernel] = {}
        self._pending: set[tuple] = set()
        self._failed = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: collections.deque[tuple] = collections.deque()
        self._worker: threading.Thread | None = None

    def get(self, key: tuple, fn: Callable[..., torch.Tensor], example: Callable[[], Sequence],
            dynamic: Sequence[tuple[int, int]]) -> Kernel | None:
        """The compiled ``fn`` for ``key``, or None while it is not ready. The first miss queues
        its compilation, warmed up on ``example()``'s arguments with the ``(argument, dim)``
        sizes in ``dynamic`` left free: the kernel then serves any value >= 2 of each (give
        the example distinct values >= 2, so no two free sizes are taken to be equal)."""
        kernel = self._ready.get(key)
        if kernel is not None or not self.enabled or self._failed:
            return kernel
        with self._lock:
            if key in self._pending:
                return None
            self._pending.add(key)
            # compiled for, and guarded on, the asking thread's team size
            self._queue.append((key, fn, example, tuple(dynamic), torch.get_num_threads()))
            if self._worker is None:  # one at a time: compiling takes both cores as it is
                self._worker = threading.Thread(target=self._work, name="tensafe-compile", daemon=True)
                self._worker.start()
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no compilation is queued or running (tests, benchmarks); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    @property
    def ready(self) -> list[tuple]:
        return list(self._ready)

    def _work(self) -> None:
        """Compile what was asked for, then end: the warm-up runs start an OpenMP team on this
        thread, and no team may outlive its work beside the step thread's (engine.threads)."""
        while True:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                job = self._queue.popleft()
            self._compile(*job)

    def _compile(self, key: tuple, fn: Callable[..., torch.Tensor], example: Callable[[], Sequence],
                 dynamic: tuple[tuple[int, int], ...], threads: int) -> None:
        compiled = None
        try:
            with confined(threads), torch.inference_mode():  # the step thread's, which the guards check
                import torch._inductor.config as inductor_config

                inductor_config.compile_threads = 1  # in this process: no worker pool forked from a server
                # a code object of its own: torch keeps compiled versions per code object, up to
                # a limit past which it runs the function uncompiled; engines that differ in
                # dtype or cache length would otherwise add up in one process (tests)
                own = types.FunctionType(fn.__code__.replace(co_name=f"{fn.__name__}_{next(_serial)}"),
                                         fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
                compiled = torch.compile(own, fullgraph=True)
                args = list(example())
                for arg, dim in dynamic:
                    torch._dynamo.mark_dynamic(args[arg], dim)
                compiled(*args)
        except Exception as exc:  # no compiler, or torch cannot compile here: eager stays
            log.warning("compiled kernels unavailable, eager kernels used instead: %s", str(exc).splitlines()[0])
            compiled = None
        with self._idle:
            if compiled is None:
                self._failed = True
            else:
                self._ready[key] = compiled
            self._pending.discard(key)
            self._idle.notify_all()
