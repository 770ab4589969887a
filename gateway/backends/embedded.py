"""The embedded engine (engine/) behind the Backend interface."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import engine as eng
from adapters.lora import LoraConfig

from ..settings import Settings
from .base import EXTENSIONS, BackendChunk, BackendRequest, Capacity, Health, Message, Tokens
from .errors import AdapterProblem, BackendOverloaded, BackendUnavailable, BadRequest, ContextTooLong

_ADAPTER_KINDS: dict[type, str] = {
    eng.AdapterNotFound: "not_found", eng.AdapterSlotsFull: "slots_full", eng.AdapterRankTooLarge: "rank_too_large",
    eng.AdapterInUse: "in_use", eng.AdapterExists: "exists", eng.InvalidAdapter: "invalid",
}


def _translate(exc: eng.EngineError) -> Exception:
    if isinstance(exc, eng.EngineOverloaded):
        return BackendOverloaded(str(exc))
    if isinstance(exc, eng.EngineClosed):
        return BackendUnavailable(str(exc))
    if isinstance(exc, eng.ContextLengthExceeded):
        return ContextTooLong(str(exc), param=exc.param)
    if isinstance(exc, eng.InvalidRequest):
        return BadRequest(str(exc), param=exc.param)
    if isinstance(exc, eng.AdapterError):
        return AdapterProblem(str(exc), exc.adapter_id, _ADAPTER_KINDS.get(type(exc), "invalid"))
    return BackendUnavailable(str(exc))


def engine_config(settings: Settings) -> eng.EngineConfig:
    """The engine's options from the gateway's settings (the engine owns their defaults)."""
    return eng.EngineConfig(
        model=settings.model, cache_dir=settings.model_cache or eng.default_cache_dir(), device=settings.device,
        dtype=settings.dtype,  # type: ignore[arg-type]
        max_num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len, max_queue=settings.max_queue,
        prefill_chunk_tokens=settings.prefill_chunk_tokens, max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank, mode=settings.engine_mode,  # type: ignore[arg-type]
        compiled_kernels=settings.engine_compiled_kernels,
    )


def _engine_config(config: LoraConfig) -> eng.AdapterConfig:
    return eng.AdapterConfig(rank=config.rank, alpha=config.alpha, target_modules=config.target_modules,
                             use_rslora=config.use_rslora)


_CONFINED: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def confine_executor(loop: asyncio.AbstractEventLoop) -> None:
    """The loop's executor threads (adapter parsing, the router's load) live as long as the
    process: confined, none of them keeps an OpenMP team beside the step thread's. Call it
    before the loop's executor first runs anything (idempotent)."""
    if loop not in _CONFINED:
        _CONFINED.add(loop)
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            thread_name_prefix="tensafe-helper", initializer=eng.confine))


class EmbeddedBackend:
    """Owns one :class:`engine.Engine`; the model loads in a worker thread on ``start``.
    ``engine``: one already running, which stays its owner's (``close`` leaves it running)."""

    #: for the long-lived helper threads of a process that runs the engine: their torch work
    #: runs single-threaded, so the step thread keeps the only OpenMP team (engine.threads)
    confine_helper_thread = staticmethod(eng.confine)
    confine_executor = staticmethod(confine_executor)

    def __init__(self, config: eng.EngineConfig, name: str = "embedded", *, engine: eng.Engine | None = None) -> None:
        self.name = name
        self.extensions = EXTENSIONS
        self.config = config
        self.engine = engine
        self._owns_engine = engine is None

    async def start(self) -> None:
        if self.engine is None:
            confine_executor(asyncio.get_running_loop())
            engine = await asyncio.to_thread(eng.Engine, self.config)  # builds on a thread of its own
            engine.start()
            self.engine = engine
            await self._warm_up(engine)

    @staticmethod
    async def _warm_up(engine: eng.Engine) -> None:
        """One short generation before the backend is started: otherwise the first request pays
        for each kernel's first run and the chat template's compilation (~0.35 s on 2 cores)."""
        request = eng.GenerationRequest("warm-up", eng.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                        messages=[eng.ChatMessage("user", "Hello")], cache_salt="warm-up")
        async for _ in engine.generate(request):
            pass

    async def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            if self._owns_engine:
                await asyncio.to_thread(engine.shutdown)

    def _engine(self) -> eng.Engine:
        if self.engine is None:
            raise BackendUnavailable("the embedded engine is not running")
        return self.engine

    async def generate(self, request: BackendRequest) -> AsyncIterator[BackendChunk]:
        engine = self._engine()
        s = request.sampling
        messages = None
        if request.messages is not None:
            messages = [eng.ChatMessage(role=m.role, content=m.content) for m in request.messages]
        ereq = eng.GenerationRequest(
            request_id=request.request_id,
            sampling=eng.SamplingParams(
                max_tokens=s.max_tokens or 1, temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                stop=s.stop, ignore_eos=s.ignore_eos, min_tokens=s.min_tokens, top_k=s.top_k,
                repetition_penalty=s.repetition_penalty, stop_token_ids=s.stop_token_ids,
            ),
            messages=messages, prompt=request.prompt, prompt_token_ids=request.prompt_token_ids,
            adapter_id=request.adapter_id, cache_salt=request.cache_salt,
        )
        if s.max_tokens is None:  # fill what the context leaves
            try:
                room = engine.max_model_len - engine.count_tokens(ereq)
            except eng.EngineError as exc:
                raise _translate(exc) from None
            ereq = dataclasses.replace(ereq, sampling=dataclasses.replace(ereq.sampling, max_tokens=max(1, room)))
        stream = engine.generate(ereq, announce=True)
        try:
            while True:
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    return
                except eng.EngineError as exc:
                    raise _translate(exc) from None
                reason = chunk.finish_reason.value if chunk.finish_reason is not None else None
                yield BackendChunk(chunk.text, chunk.prompt_tokens, chunk.completion_tokens, reason)
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.abort(request_id)

    async def tokenize(self, *, prompt: str | None = None, messages: Sequence[Message] | None = None,
                       add_special_tokens: bool = False, add_generation_prompt: bool = True,
                       with_strings: bool = False) -> Tokens:
        engine = self._engine()
        chat = None if messages is None else [eng.ChatMessage(role=m.role, content=m.content) for m in messages]

        def run() -> Tokens:
            ids = engine.tokenize(prompt=prompt, messages=chat, add_special_tokens=add_special_tokens,
                                  add_generation_prompt=add_generation_prompt)
            return Tokens(ids, engine.token_strings(ids) if with_strings else None)

        try:
            return await asyncio.to_thread(run)
        except eng.EngineError as exc:
            raise _translate(exc) from None

    async def detokenize(self, ids: Sequence[int]) -> str:
        engine = self._engine()
        try:
            return await asyncio.to_thread(engine.detokenize, list(ids))
        except eng.EngineError as exc:
            raise _translate(exc) from None

    def adapter_layout(self) -> str:
        """The engine's stacked slot layout, which depends on its model and dtype."""
        info = self._engine().info()
        return f"engine:{info.name}:{info.dtype}"

    def prepare_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> Mapping[str, Any]:
        try:
            return self._engine().prepare_adapter(adapter_id, tensors, _engine_config(config))
        except eng.EngineError as exc:
            raise _translate(exc) from None

    async def load_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> None:
        engine = self._engine()
        try:
            await engine.load_adapter_async(adapter_id, tensors, _engine_config(config))
        except eng.EngineError as exc:
            raise _translate(exc) from None

    async def unload_adapter(self, adapter_id: str) -> None:
        try:
            self._engine().unload_adapter(adapter_id)
        except eng.EngineError as exc:
            raise _translate(exc) from None

    def adapters(self) -> list[str]:
        return self.engine.adapters() if self.engine is not None else []

    async def health(self) -> Health:
        if self.engine is None:
            return Health(ok=False, model=self.config.model, max_model_len=0, detail="not started")
        info = self.engine.info()
        return Health(ok=True, model=info.name, max_model_len=info.max_model_len,
                      detail=f"{info.device}/{info.dtype}")

    async def model_config(self) -> dict[str, Any] | None:
        return self.engine.model_config() if self.engine is not None else None

    def capacity(self) -> Capacity:
        if self.engine is None:
            return Capacity(0, 0, 0, 0, 0)
        c = self.engine.capacity()
        return Capacity(c.free_sequence_slots, c.free_adapter_slots, c.queue_depth, c.max_sequence_slots,
                        c.max_adapter_slots, self.config.max_lora_rank)
