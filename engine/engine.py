"""The engine: an async API over a step thread that owns torch.

The event loop only enqueues commands and awaits per-request queues; every tensor operation
runs on one dedicated thread (torch releases the GIL inside kernels, so the loop stays
responsive). Outputs of one iteration reach the loop in a single thread-safe callback.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import torch

from .config import EngineConfig, default_kernel_cache_dir
from .errors import (
    AdapterInUse,
    ContextLengthExceeded,
    EngineClosed,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
)
from .kernels import BackgroundKernels
from .kv_cache import KVCache, plan_slots
from .lora import LoraSlots, StackedLora
from .lora.native import load as slot_kernel
from .model.checkpoint import resolve_checkpoint
from .model.llama import LlamaModel
from .model.packed import can_pack, pack_layers
from .model.rope import Rope
from .model.weights import load_weights
from .prefix_cache import BLOCK, PrefixCache
from .scheduler import Scheduler
from .sequence import Sequence
from .stops import StopMatcher
from .threads import run_apart
from .tokenizer import Tokenizer
from .types import AdapterConfig, Capacity, ChatMessage, GenerationChunk, GenerationRequest, ModelInfo

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _use_compile_cache() -> None:
    """Keep inductor's compiled kernels in the kernel cache, so a second start of the compiled
    mode reuses them."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_kernel_cache_dir() / "inductor"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def _cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls about 2x fp32; without them (AVX2 only) bf16 is
    emulated and several times slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


class Engine:
    """Embedded multi-LoRA inference engine. Construct (loads the model, blocking), ``start()``,
    then ``generate`` from an event loop. See the module docstring for the threading model."""

    def __init__(self, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        self.config = config
        # built on a thread that ends with the build: an OpenMP team left on the caller's thread
        # would make every parallel op of the step thread sleep and wake (see engine.threads)
        run_apart(self._build, "tensafe-engine-build")
        self._scheduler = Scheduler(
            self.model, self.cache, self.lora, self.tokenizer, config.prefill_chunk_tokens, self.device,
            self._released, self.prefixes,
        )
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self._running = 0
        self._users: collections.Counter[str] = collections.Counter()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._arrivals = itertools.count()
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "engine ready: %s on %s/%s, %d sequence slots x %d tokens (KV %.0f MiB), %d adapter slots (rank <= %d), %.1fs",
            self.name, self.device, str(self.dtype).removeprefix("torch."), self.cache.slots, self.max_model_len,
            self.cache.nbytes / 2**20, config.max_loras, config.max_lora_rank, self.load_seconds,
        )

    def _build(self) -> None:
        """The model, the KV cache and the adapter slots (torch work: runs apart)."""
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = _pick_device(config.device)
        self.dtype = _pick_dtype(config.dtype, self.device)
        checkpoint = resolve_checkpoint(config.model, config.cache_dir)
        self.checkpoint = checkpoint
        weights = load_weights(checkpoint, self.dtype, self.device)
        dims = weights.dims
        self.dims = dims
        self.max_model_len = min(config.max_model_len, dims.max_position_embeddings)
        slots = plan_slots(config, dims, self.dtype, self.max_model_len)
        self.tokenizer = Tokenizer(checkpoint)
        self.cache = KVCache(dims, slots, self.max_model_len, self.dtype, self.device)
        self.lora = LoraSlots(dims, config.max_loras, config.max_lora_rank, self.dtype, self.device)
        if config.lora_form != "auto":
            self.lora.mixed_form = self.lora.matmul_form = config.lora_form
        rope = Rope(checkpoint, self.max_model_len, self.dtype, self.device)
        # in eager mode on the CPU, decode attention switches to a compiled kernel once one is
        # built in the background (engine.kernels); the compiled mode compiles the whole step
        kernels = None
        if config.mode == "eager" and config.compiled_kernels and self.device.type == "cpu":
            _use_compile_cache()
            kernels = BackgroundKernels()
            if config.lora_form == "auto":  # thin batches' LoRA straight from the slots
                self.lora.native = slot_kernel(default_kernel_cache_dir())
        # eager on a bf16 CPU: the layer projections' weights in oneDNN's layout (engine.model.packed)
        packed = config.mode == "eager" and config.packed_weights and can_pack(self.dtype, self.device) and pack_layers(weights)
        self.model = LlamaModel(weights, rope, self.cache, kernels, packed)
        if config.mode == "compile":
            _use_compile_cache()
            self.model.compile()
        self.name = config.model if "/" not in config.model else checkpoint.name
        blocks = config.prefix_cache_tokens // BLOCK
        self.prefixes = PrefixCache(self.cache, blocks) if blocks else None

    # ---- lifecycle ------------------------------------------------------------------------
    def wait_for_kernels(self, timeout: float | None = None) -> list[str]:
        """Block until no kernel compiles in the background (benchmarks, tests); the names of
        those in use."""
        kernels = self.model.kernels
        native = ["slot_lora"] if self.lora.native is not None else []
        if kernels is None:
            return native
        kernels.wait(timeout)
        return [key[0] for key in kernels.ready] + native

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tensafe-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything still running and stop the step thread."""
        with self._lock:
            self._closed = True
        self._inbox.put(("stop", None))
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- public API --------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name, max_model_len=self.max_model_len, vocab_size=self.dims.vocab_size,
            hidden_size=self.dims.hidden_size, num_layers=self.dims.num_layers,
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
        )

    def model_config(self) -> dict[str, Any]:
        """The served checkpoint's Hugging Face ``config.json``, as a dict (a copy)."""
        return json.loads((self.checkpoint / "config.json").read_text())

    def count_tokens(self, request: GenerationRequest) -> int:
        return len(self.tokenizer.encode(request))

    def tokenize(self, *, prompt: str | None = None, messages: list[ChatMessage] | None = None,
                 add_special_tokens: bool = False, add_generation_prompt: bool = True) -> list[int]:
        """The token ids of ``prompt``, or of ``messages`` rendered with the chat template."""
        return self.tokenizer.tokenize(prompt=prompt, messages=messages, add_special_tokens=add_special_tokens,
                                       add_generation_prompt=add_generation_prompt)

    def token_strings(self, ids: list[int]) -> list[str]:
        self._check_ids(ids, "tokens")
        return self.tokenizer.token_strings(ids)

    def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens included (the inverse of ``tokenize``)."""
        self._check_ids(ids, "tokens")
        return self.tokenizer.backend.decode(list(ids), skip_special_tokens=False)

    def _check_ids(self, ids: list[int], param: str) -> None:
        if any(t < 0 or t >= self.dims.vocab_size for t in ids):
            raise InvalidRequest("a token id is out of the vocabulary", param=param)

    def capacity(self) -> Capacity:
        with self._lock:
            inflight, running = len(self._inflight), self._running
        return Capacity(
            free_sequence_slots=self.cache.slots - running,
            free_adapter_slots=self.lora.free(),
            queue_depth=max(0, inflight - running),
            max_sequence_slots=self.cache.slots,
            max_adapter_slots=self.lora.num_slots,
            max_queue=self.config.max_queue,
        )

    def adapters(self) -> list[str]:
        return self.lora.ids()

    def prepare_adapter(self, adapter_id: str, tensors: Mapping[str, torch.Tensor], config: AdapterConfig) -> StackedLora:
        """Validate an adapter and lay it out for the slots (blocking, any thread). Keeping the
        result instead of the raw tensors makes every later ``load_adapter`` a few strided copies."""
        return self.lora.prepare(adapter_id, tensors, config)

    def load_adapter(self, adapter_id: str, tensors: Mapping[str, torch.Tensor], config: AdapterConfig) -> None:
        """Copy an adapter (PEFT tensors or a StackedLora from ``prepare_adapter``) into a free
        slot. Blocking; the copy itself runs on the step thread, between two steps."""
        stacked = self.lora.prepare(adapter_id, tensors, config)
        with self._loading(adapter_id, stacked) as written:
            written.result()

    async def load_adapter_async(
        self, adapter_id: str, tensors: Mapping[str, torch.Tensor], config: AdapterConfig
    ) -> None:
        """``load_adapter`` for an event loop: raw tensors are prepared in a worker thread, the
        copy runs on the step thread, and the loop never blocks."""
        if isinstance(tensors, StackedLora):
            stacked = self.lora.prepare(adapter_id, tensors, config)  # already laid out: checks only
        else:
            stacked = await asyncio.to_thread(self.lora.prepare, adapter_id, tensors, config)
        with self._loading(adapter_id, stacked) as written:
            await asyncio.wrap_future(written)

    @contextlib.contextmanager
    def _loading(self, adapter_id: str, stacked: StackedLora) -> Iterator[concurrent.futures.Future]:
        """Reserve a slot and queue the copy on the step thread; the block waits for it. The
        adapter is usable once the block ends; if it raises (the copy failed, the caller gave up)
        the slot is given back."""
        with self.lora.loading(adapter_id, stacked) as slot:
            yield self._on_step_thread(functools.partial(self.lora.write, slot, stacked))

    def _on_step_thread(self, fn: Callable[[], None]) -> concurrent.futures.Future:
        """Run ``fn`` on the step thread, between two steps. Torch's parallel ops on another
        thread would start a second OpenMP team, and with more team threads than cores every
        parallel op pays a sleep/wake (an adapter copy took 2-3x longer that way)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # queued before "stop" or not at all
            thread = self._thread
            inline = thread is None or self._closed or threading.current_thread() is thread
            if not inline:
                self._inbox.put(("call", (fn, done)))
        if inline:
            _settle(done, fn)
        else:
            self._wake.set()
        return done

    def unload_adapter(self, adapter_id: str) -> None:
        """Refuses (AdapterInUse) while any request, running or waiting, uses the adapter."""
        with self._lock:
            users = self._users.get(adapter_id, 0)
            if users:
                raise AdapterInUse(adapter_id, users)
            self.lora.unload(adapter_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def generate(self, request: GenerationRequest, *, announce: bool = False
                       ) -> AsyncIterator[GenerationChunk]:
        """Stream the completion. With ``announce``, the first chunk comes as soon as the request
        is accepted (validated, its prompt counted, queued): no text, ``completion_tokens`` 0."""
        seq = self._submit(request, asyncio.get_running_loop())
        finished = False
        try:
            if announce:
                yield GenerationChunk(request.request_id, "", (), seq.prompt_len, 0)
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    # ---- internals ---------------------------------------------------------------------
    def _submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Sequence:
        if self._closed:
            raise EngineClosed()
        p = request.sampling
        if p.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {p.max_tokens}", param="max_tokens")
        if not (0.0 < p.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {p.top_p}", param="top_p")
        if p.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {p.temperature}", param="temperature")
        if p.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0: off), got {p.top_k}", param="top_k")
        if not 0 <= p.min_tokens <= p.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens {p.max_tokens}], got {p.min_tokens}",
                                 param="min_tokens")
        if not (0.0 < p.repetition_penalty < float("inf")):
            raise InvalidRequest(f"repetition_penalty must be > 0, got {p.repetition_penalty}",
                                 param="repetition_penalty")
        if any(t < 0 or t >= self.dims.vocab_size for t in p.stop_token_ids):
            raise InvalidRequest("stop_token_ids holds a token id out of the vocabulary", param="stop_token_ids")
        prompt_ids = self.tokenizer.encode(request)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if any(t < 0 or t >= self.dims.vocab_size for t in prompt_ids):
            raise InvalidRequest("prompt token id out of the vocabulary", param="prompt")
        if len(prompt_ids) + p.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(len(prompt_ids), p.max_tokens, self.max_model_len)
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(p.seed)
        with self._lock:
            if request.request_id in self._inflight:
                raise InvalidRequest(f"request id {request.request_id!r} is already in flight")
            limit = self.cache.slots + self.config.max_queue
            if len(self._inflight) >= limit:
                raise EngineOverloaded(len(self._inflight) - self.cache.slots, self.config.max_queue)
            slot = -1 if request.adapter_id is None else self.lora.slot_of(request.adapter_id)
            if request.adapter_id is not None:
                self._users[request.adapter_id] += 1
            self._inflight.add(request.request_id)
        seq = Sequence(
            request=request, prompt_ids=prompt_ids, adapter_slot=slot, loop=loop, queue=asyncio.Queue(),
            detok=self.tokenizer.decode_stream(prompt_ids), stops=StopMatcher(p.stop), generator=generator,
        )
        self._inbox.put(("add", seq))
        self._wake.set()
        return seq

    def _released(self, seq: Sequence) -> None:
        """Called on the step thread when a sequence leaves the engine."""
        with self._lock:
            self._inflight.discard(seq.request_id)
            aid = seq.request.adapter_id
            if aid is not None:
                self._users[aid] -= 1
                if self._users[aid] <= 0:
                    del self._users[aid]

    def _run(self) -> None:
        sched = self._scheduler
        torch.set_grad_enabled(False)
        while True:
            self._wake.clear()
            outbox: list[tuple[Sequence, object]] = []
            emit = lambda seq, chunk: outbox.append((seq, chunk))  # noqa: E731
            stop = self._drain(sched, emit)
            if stop:
                sched.abort_all(emit)
                self._deliver(outbox)
                return
            if sched.idle:
                self._publish(sched, outbox)
                self._wake.wait()
                continue
            try:
                sched.step(emit)
            except Exception as exc:  # a bug or an allocation failure: fail these requests, keep serving
                log.exception("engine step failed; failing %d running requests", len(sched.running))
                error = EngineError(f"internal engine error: {type(exc).__name__}")
                failed = list(sched.by_id.values())
                sched.abort_all(lambda seq, chunk: None)
                outbox.extend((seq, error) for seq in failed)
            self._publish(sched, outbox)

    def _publish(self, sched: Scheduler, outbox: list) -> None:
        with self._lock:
            self._running = len(sched.running)
        self._deliver(outbox)

    def _drain(self, sched: Scheduler, emit) -> bool:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return False
            if kind == "add":
                sched.add(arg)
            elif kind == "abort":
                sched.abort(arg, emit)
            elif kind == "call":
                _settle(arg[1], arg[0])
            elif kind == "stop":  # calls are only queued before it (see _on_step_thread)
                return True

    @staticmethod
    def _deliver(outbox: list[tuple[Sequence, object]]) -> None:
        if not outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, item in outbox:
            by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass


def _settle(done: concurrent.futures.Future, fn: Callable[[], None]) -> None:
    if not done.set_running_or_notify_cancel():
        return  # the caller gave up before it ran
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
        done.set_exception(exc)
    else:
        done.set_result(None)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
