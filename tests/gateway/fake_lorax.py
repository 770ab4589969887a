"""A fake LoRAX for tests: a real Starlette app that speaks the part of LoRAX's REST protocol
the gateway uses and really generates, with our embedded engine (LoRAX itself needs a GPU).

It follows predibase/lorax at commit ``a7394ba386ece427d5a6125b419aa38b46d966dc``. Each part is
cited here; no code is copied:

- Request and response shapes (GenerateParameters, GenerateResponse, Details, StreamResponse,
  StreamDetails, Token, ErrorResponse, Info): ``router/src/lib.rs``.
- Routes, SSE framing, ``x-*`` headers and the error -> status mapping: ``router/src/server.rs``.
  Events are ``data: <compact json>`` lines with no ``[DONE]``; an error is one event on a 200 stream.
- Validation order and messages (``Input validation error: ...``): ``router/src/validation.rs``.
- Overload check, then validation, then queueing; error texts: ``router/src/infer.rs``. The
  overload check is a try-acquire of a permit (429 ``overloaded``).
- Adapters are loaded on first use and offloaded only when another one needs the room:
  ``router/src/loader.rs`` and ``queue.rs``. A failure is 424 ``generation``:
  ``Request failed during generation: Server error: <msg>``.
- The ``local`` source (absolute path or ``$HUGGINGFACE_HUB_CACHE/<id>``, 5-character minimum,
  weights message): ``server/lorax_server/utils/sources/local.py``. Missing config:
  ``adapters/__init__.py``.
- Token texts and ``generated_text``: ``server/lorax_server/models/model.py`` ``decode_token``
  and ``flash_causal_lm.py``. Token texts are decoded incrementally and keep special tokens;
  ``generated_text`` skips them. LoRAX samples only if ``do_sample``, temperature not in {0, 1},
  top_k, top_p < 1 or typical_p < 1: ``server/lorax_server/utils/tokens.py``.
- axum 0.7 ``Json`` rejections happen before the handler and are plain text: 415, 400 (bad JSON),
  422 (wrong types), 413 (over 2 MiB).

Known deviations:

- ``logprob`` is always ``0.0``: the engine exposes no logprobs. Prefill logprobs are ``null``,
  then ``0.0``.
- serde's 400/422 messages are approximate and give no ``at line L column C``.
- The engine stops when a stop string appears anywhere in the new text. LoRAX stops only when the
  output ends with it. In both, ``generated_text`` keeps the stop string.
- EOS is the engine's set (generation_config plus the tokenizer's eos; SmolLM2: id 2 only).
- Not generated: ``best_of`` > 1 and ``merged_adapters`` (both 424 after validation) and
  ``alternative_tokens``.
- Validated as LoRAX validates, then ignored: typical_p (it only turns sampling on),
  frequency/presence_penalty, watermark, response_format and api_token.
- No SSE keep-alive. Timing headers are a rough split in ms, and ``x-queue-time`` is 0.
- Only ``local`` can load, since nothing can be downloaded here. ``hub``, ``s3``, ``pbase`` and
  unknown sources all answer ``Invalid source '<src>' when downloading adapter '<id>'``. A null
  source means ``default_adapter_source`` (an extra keyword; LoRAX's launcher default is
  ``hub``). Weights must be ``adapter_model.safetensors`` (``engine.peft_dir``); LoRAX globs
  ``*.safetensors``. A relative id resolves only when ``$HUGGINGFACE_HUB_CACHE`` is set.
- Slots: at most ``max_active_adapters``. LoRAX uses a memory budget and a 2 s cycle time
  instead. When a slot is needed, the least recently used idle adapter is offloaded; if none is
  idle, the request waits. An offloaded adapter is read from disk again on its next use, so one
  deleted meanwhile fails with 424. Caveat: LoRAX's ``load_module_map`` is ``lru_cache``d
  (seen at another commit), so a real server may serve it from host memory.
- Ranks above ``max_lora_rank`` fail with the engine's message. LoRAX has no such limit.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import engine as eng
from engine.peft_dir import load_peft_dir
from gateway.backends.embedded import EmbeddedBackend

from .lorax_wire import Fail, Rejected, generation_error, invalid, parse_body


@dataclasses.dataclass
class Job:
    """A validated request (router/src/validation.rs ValidGenerateRequest)."""

    inputs: str
    ids: list[int]  # prompt token ids, as the router counted them
    sampling: eng.SamplingParams
    do_sample: bool  # whether LoRAX would sample (then details.seed is reported)
    seed: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    adapter_id: str | None  # None: the base model
    adapter_source: str


@dataclasses.dataclass
class Outcome:
    """Filled in by ``FakeLorax._generate`` before it yields the last token."""

    finish_reason: str | None = None
    generated_text: str | None = None
    first_token_at: float | None = None


class Watched:
    """Runs ``produce`` while watching ``receive``: a client that disconnects cancels it where
    it waits, and its ``finally`` blocks abort the engine request (axum drops the handler)."""

    def __init__(self, produce: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task, gone = asyncio.current_task(), False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            assert task is not None
            task.cancel()  # the task is suspended inside produce: that is where it lands

        watcher = asyncio.ensure_future(watch())
        try:
            await self.produce(scope, receive, send)
        except asyncio.CancelledError:
            if not gone:
                raise
            assert task is not None
            task.uncancel()
        except OSError:  # a gone client reported on send
            pass
        finally:
            watcher.cancel()


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class FakeLorax:
    """LoRAX's /generate, /generate_stream, /info and /health over a real engine.

    ``loads``: resolved paths of adapters read from disk and loaded into the engine, in order;
    ``offloads``: paths of adapters offloaded, in order; ``healthy``: what /health answers;
    ``max_concurrent_requests`` may be changed by a test; ``in_flight``: requests holding a permit.
    """

    def __init__(self, checkpoint: Path, *, model_id: str = "smollm2-135m-instruct", max_concurrent_requests: int = 8,
                 max_batch: int = 4, max_total_tokens: int = 1024, max_input_length: int = 1023,
                 max_active_adapters: int = 2, max_lora_rank: int = 16, dtype: str = "float32",
                 default_adapter_source: str = "hub") -> None:
        self.model_id, self.dtype = model_id, dtype
        self.max_concurrent_requests, self.max_batch = max_concurrent_requests, max_batch
        self.max_total_tokens, self.max_input_length = max_total_tokens, max_input_length
        self.max_active_adapters, self.max_stop_sequences, self.max_best_of = max_active_adapters, 4, 2
        self.default_adapter_source = default_adapter_source
        self.loads: list[str] = []
        self.offloads: list[str] = []
        self.healthy = True
        self.in_flight = 0
        self._backend = EmbeddedBackend(eng.EngineConfig(
            model=str(checkpoint), device="cpu", dtype=dtype,  # type: ignore[arg-type]
            max_num_seqs=max_batch, max_model_len=max_total_tokens, max_loras=max_active_adapters,
            max_lora_rank=max_lora_rank,
        ))
        self._active: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> path, LRU first
        self._users: collections.Counter[str] = collections.Counter()
        self._load_lock = asyncio.Lock()
        self._freed = asyncio.Event()
        self._special: frozenset[int] = frozenset()

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await self._backend.start()
            decoder = self.engine.tokenizer.backend.get_added_tokens_decoder()
            self._special = frozenset(i for i, t in decoder.items() if t.special)
            try:
                yield
            finally:
                await self._backend.close()

        self.app = Starlette(routes=[
            Route("/generate", self.generate, methods=["POST"]),
            Route("/generate_stream", self.generate_stream, methods=["POST"]),
            Route("/info", self.info, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ping", self.health, methods=["GET"]),
        ], lifespan=lifespan)

    @property
    def engine(self) -> eng.Engine:
        if self._backend.engine is None:
            raise generation_error("the engine is not running")
        return self._backend.engine

    # ---- routes ---------------------------------------------------------------------------
    async def _body(self, request: Request) -> dict[str, Any] | Response:
        try:
            return parse_body(request.headers.get("content-type", ""), await request.body())
        except Rejected as exc:
            return PlainTextResponse(exc.text, status_code=exc.status)

    async def generate(self, request: Request) -> Any:
        body = await self._body(request)
        return body if isinstance(body, Response) else Watched(lambda *asgi: self._respond(body, *asgi))

    async def generate_stream(self, request: Request) -> Any:
        body = await self._body(request)
        return body if isinstance(body, Response) else Watched(lambda *asgi: self._stream(body, *asgi))

    async def info(self, request: Request) -> Response:
        return JSONResponse({
            "model_id": self.model_id, "model_sha": None, "model_dtype": f"torch.{self.dtype}",
            "model_device_type": "cpu", "model_pipeline_tag": None,
            "max_concurrent_requests": self.max_concurrent_requests, "max_best_of": self.max_best_of,
            "max_stop_sequences": self.max_stop_sequences, "max_input_length": self.max_input_length,
            "max_total_tokens": self.max_total_tokens, "waiting_served_ratio": 1.2,
            "max_batch_total_tokens": self.max_batch * self.max_total_tokens, "max_waiting_tokens": 20,
            "validation_workers": 2, "eager_prefill": False, "version": "0.1.0", "sha": None, "docker_label": None,
            "request_logger_url": None,
        })

    async def health(self, request: Request) -> Response:
        if self.healthy:
            return Response(status_code=200)
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)

    # ---- responses --------------------------------------------------------------------------
    def _headers(self, body: dict[str, Any]) -> dict[str, str]:
        params = body["parameters"]
        headers = {"x-compute-type": "gpu+optimized", "x-compute-characters": str(len(body["inputs"])),
                   "x-model-id": self.model_id}
        if params.get("adapter_id"):
            headers["x-adapter-id"] = params["adapter_id"]
            headers["x-adapter-source"] = params.get("adapter_source") or self.default_adapter_source
        return headers

    async def _respond(self, body: dict[str, Any], scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        headers = self._headers(body)
        try:
            with self._permit():
                job = self._validate(body)
                t1, outcome = time.perf_counter(), Outcome()
                async with contextlib.aclosing(self._generate(job, outcome)) as tokens:
                    toks = [tok async for tok, _ in tokens]
        except Fail as exc:
            await JSONResponse(exc.body(), status_code=exc.status)(scope, receive, send)
            return
        t2 = time.perf_counter()
        answer: dict[str, Any] = {"generated_text": outcome.generated_text}
        if job.details or job.decoder_input_details:
            answer["details"] = {**self._details(job, outcome, len(toks)), "skipped_tokens": 0,
                                 "seed": job.seed if job.do_sample else None,
                                 "prefill": self._prefill(job) if job.decoder_input_details else [], "tokens": toks}
        n, ms = len(toks), lambda s: str(int(s * 1000))
        infer, first = t2 - t1, (outcome.first_token_at or t2) - t1
        headers.update({
            "x-total-time": ms(t2 - t0), "x-validation-time": ms(t1 - t0), "x-queue-time": "0",
            "x-inference-time": ms(infer), "x-compute-time": ms(infer), "x-time-per-token": ms(infer / max(1, n)),
            "x-time-to-first-token": ms(first), "x-time-per-output-token": ms((infer - first) / max(1, n - 1)),
            "x-prompt-tokens": str(len(job.ids)), "x-generated-tokens": str(n), "x-skipped-tokens": "0",
            "x-total-tokens": str(len(job.ids) + n),
        })
        await JSONResponse(answer, headers=headers)(scope, receive, send)

    async def _stream(self, body: dict[str, Any], scope: Scope, receive: Receive, send: Send) -> None:
        headers = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no",
                   **self._headers(body)}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})

        async def emit(event: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "body": sse(event), "more_body": True})

        params = body["parameters"]
        try:
            if (params.get("best_of") or 1) != 1:  # server.rs checks these before infer.rs
                raise invalid("`best_of` != 1 is not supported when streaming tokens")
            if params.get("decoder_input_details"):
                raise invalid("`decoder_input_details` == true is not supported when streaming tokens")
            with self._permit():
                job, outcome = self._validate(body), Outcome()
                async with contextlib.aclosing(self._generate(job, outcome)) as tokens:
                    n = 0
                    async for tok, last in tokens:
                        n += 1
                        details = None
                        if last and job.details:
                            details = {**self._details(job, outcome, n), "seed": job.seed if job.do_sample else None}
                        await emit({"token": tok, "generated_text": outcome.generated_text if last else None,
                                    "details": details})
        except Fail as exc:
            await emit(exc.body())
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    def _details(job: Job, outcome: Outcome, n: int) -> dict[str, Any]:
        return {"finish_reason": outcome.finish_reason, "prompt_tokens": len(job.ids), "generated_tokens": n}

    def _prefill(self, job: Job) -> list[dict[str, Any]]:
        decode = self.engine.tokenizer.backend.decode
        return [{"id": t, "text": decode([t], skip_special_tokens=False), "logprob": None if i == 0 else 0.0}
                for i, t in enumerate(job.ids)]

    @contextlib.contextmanager
    def _permit(self) -> Iterator[None]:
        if self.in_flight >= self.max_concurrent_requests:
            raise Fail(429, "Model is overloaded", "overloaded")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    # ---- validation (router/src/validation.rs, in its order) --------------------------------
    def _validate(self, body: dict[str, Any]) -> Job:
        p: dict[str, Any] = body["parameters"]
        merged = p.get("merged_adapters")
        if merged is not None and p.get("adapter_id") is not None:
            raise invalid("at most one of `adapter_id` or `adapters` may be provided")
        best_of = p.get("best_of") or 1
        temperature, top_k, top_p, typical_p = (p.get(k) for k in ("temperature", "top_k", "top_p", "typical_p"))
        do_sample = bool(p.get("do_sample"))
        if best_of > 1 and not (do_sample or any(v is not None for v in (temperature, top_k, top_p, typical_p))):
            raise invalid("you must use sampling when `best_of` is > 1")
        temperature = 1.0 if temperature is None else float(temperature)
        if temperature < 0.0:
            raise invalid("`temperature` must be non-negative")
        repetition_penalty = 1.0 if p.get("repetition_penalty") is None else float(p["repetition_penalty"])
        if repetition_penalty <= 0.0:
            raise invalid("`repetition_penalty` must be strictly positive")
        for name in ("frequency_penalty", "presence_penalty"):
            if p.get(name) is not None and not -2.0 <= p[name] <= 2.0:
                raise invalid(f"`{name}` must be >= -2.0 and <= 2.0")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise invalid("`top_p` must be > 0.0 and < 1.0")
        if typical_p is not None and not 0.0 < typical_p < 1.0:
            raise invalid("`typical_p` must be > 0.0 and < 1.0")
        if top_k is not None and top_k <= 0:
            raise invalid("`top_k` must be strictly positive")
        if p.get("return_k_alternatives") is not None and p["return_k_alternatives"] <= 0:
            raise invalid("`return_k_alternatives` must be strictly positive")
        max_new = p.get("max_new_tokens")
        if max_new == 0:
            raise invalid("`max_new_tokens` must be strictly positive")
        stop = list(p.get("stop") or [])
        if len(stop) > self.max_stop_sequences:
            raise invalid(f"`stop` supports up to {self.max_stop_sequences} stop sequences. Given: {len(stop)}")
        if p.get("seed") is not None and best_of > 1:
            raise invalid("`seed` must not be set when `best_of` > 1")
        seed = p["seed"] if p.get("seed") is not None else random.getrandbits(64)
        inputs: str = body["inputs"]
        if not inputs:
            raise invalid("`inputs` cannot be empty")
        truncate = p.get("truncate")
        if truncate is not None and (truncate == 0 or truncate > self.max_input_length):
            raise invalid(f"`truncate` must be strictly positive and less than {self.max_input_length}. "
                          f"Given: {truncate}")
        try:  # the router's HF tokenizer: add_special_tokens=true
            ids = self.engine.tokenize(prompt=inputs, add_special_tokens=True)
        except Exception as exc:  # noqa: BLE001 - reported as LoRAX reports it
            raise invalid(f"tokenizer error {exc}") from None
        if truncate is not None and truncate < len(ids):
            ids = ids[-truncate:]
            inputs = self.engine.tokenizer.backend.decode(ids, skip_special_tokens=False)
        if max_new is not None and len(ids) + max_new > self.max_total_tokens:
            raise invalid(f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                          f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`")
        if len(ids) > self.max_input_length:
            raise invalid(f"`inputs` must have less than {self.max_input_length} tokens. Given: {len(ids)}")
        if best_of > 1:
            if best_of > self.max_best_of:
                raise invalid(f"`best_of` must be > 0 and <= {self.max_best_of}. Given: {best_of}")
            raise generation_error("best_of > 1 is not supported by this fake LoRAX")
        if merged is not None:
            raise generation_error("merged_adapters are not supported by this fake LoRAX")
        max_new = max_new if max_new is not None else self.max_total_tokens - len(ids)
        # lorax_server/utils/tokens.py: greedy unless one of these asks for sampling
        sampling = temperature != 0.0 and (do_sample or temperature != 1.0 or top_k is not None
                                           or (top_p or 1.0) < 1.0 or (typical_p or 1.0) < 1.0)
        params = eng.SamplingParams(
            max_tokens=max(1, max_new), temperature=temperature if sampling else 0.0,
            top_p=float(top_p or 1.0) if sampling else 1.0, top_k=int(top_k or 0) if sampling else 0,
            seed=seed if sampling else None, stop=tuple(stop), ignore_eos=bool(p.get("ignore_eos_token")),
            repetition_penalty=repetition_penalty,
        )
        return Job(inputs, ids, params, sampling, seed, bool(p.get("details")), bool(p.get("decoder_input_details")),
                   bool(p.get("return_full_text")), p.get("adapter_id") or None,
                   p.get("adapter_source") or self.default_adapter_source)

    # ---- generation ---------------------------------------------------------------------------
    async def _generate(self, job: Job, outcome: Outcome) -> AsyncIterator[tuple[dict[str, Any], bool]]:
        """Yield ``(token, is_last)``, one per generated token id; ``outcome`` is complete
        before the last one."""
        engine = self.engine
        name = await self._acquire_adapter(job.adapter_id, job.adapter_source) if job.adapter_id else None
        try:
            request = eng.GenerationRequest(request_id=f"lorax-{uuid.uuid4().hex}", sampling=job.sampling,
                                            prompt_token_ids=job.ids, adapter_id=name)
            decode = engine.tokenizer.backend.decode
            all_ids, prefix, read = list(job.ids), max(0, len(job.ids) - 5), len(job.ids)
            stream = engine.generate(request)
            try:
                async for chunk in stream:
                    if chunk.finish_reason is eng.FinishReason.ABORT or (chunk.finish_reason and not chunk.token_ids):
                        raise Fail(500, "Incomplete generation", "incomplete_generation")
                    for i, tid in enumerate(chunk.token_ids):
                        outcome.first_token_at = outcome.first_token_at or time.perf_counter()
                        all_ids.append(tid)
                        # models/model.py decode_token: text only once it is no longer a partial char
                        before = decode(all_ids[prefix:read], skip_special_tokens=False)
                        after = decode(all_ids[prefix:], skip_special_tokens=False)
                        text = ""
                        if len(after) > len(before) and not after.endswith("\ufffd"):
                            text, prefix, read = after[len(before):], read, len(all_ids)
                        last = chunk.finish_reason is not None and i == len(chunk.token_ids) - 1
                        if last:
                            outcome.finish_reason = self._finish_reason(job, chunk)
                            generated = decode(all_ids[len(job.ids):], skip_special_tokens=True)
                            outcome.generated_text = job.inputs + generated if job.return_full_text else generated
                        yield {"id": tid, "text": text, "logprob": 0.0, "special": tid in self._special,
                               "skipped": False}, last
            except eng.EngineError as exc:
                raise generation_error(str(exc)) from None
            finally:
                await stream.aclose()  # aborts the engine request if it is still running
        finally:
            if name is not None:
                self._users[name] -= 1
                self._freed.set()

    def _finish_reason(self, job: Job, chunk: eng.GenerationChunk) -> str:
        """TGI's StoppingCriteria order: length first, then EOS, then a stop sequence; the
        engine reports ``stop`` for both of the latter."""
        if chunk.finish_reason is eng.FinishReason.LENGTH or chunk.completion_tokens >= job.sampling.max_tokens:
            return "length"
        if chunk.token_ids[-1] in self.engine.tokenizer.eos_ids and not job.sampling.ignore_eos:
            return "eos_token"
        return "stop_sequence"

    # ---- adapters -------------------------------------------------------------------------------
    def _local_path(self, adapter_id: str, source: str) -> Path:
        """lorax_server/utils/sources/local.py, then the config and weights checks."""
        if source.lower() != "local":  # only local can be read here (see the module docstring)
            raise generation_error(f"Invalid source '{source}' when downloading adapter '{adapter_id}'")
        if len(adapter_id) < 5:
            raise generation_error(f"model_id '{adapter_id}' is too short for prefix filtering")
        cache = os.environ.get("HUGGINGFACE_HUB_CACHE")
        path = Path(adapter_id) if os.path.isabs(adapter_id) else (Path(cache) / adapter_id if cache else None)
        if path is None or not (path / "adapter_config.json").is_file():
            raise generation_error("No valid adapter config file found: tried None and None")
        if not path.is_dir() or not any(path.glob("*.safetensors")):
            raise generation_error(f"No local weights found in {adapter_id} with extension .safetensors")
        return path

    async def _acquire_adapter(self, adapter_id: str, source: str) -> str:
        """The adapter's engine id, counted as used until released. Adapters are keyed by id
        alone (LoRAX's AdapterParameters hash), so an active one is reused whatever the source."""
        if adapter_id not in self._active:  # requests for active adapters never wait on a load
            async with self._load_lock:  # one load at a time, FIFO (loader.rs)
                if adapter_id not in self._active:
                    await self._load(adapter_id, source)
        # no await since the check or the load: nothing can have offloaded it
        self._active.move_to_end(adapter_id)
        self._users[adapter_id] += 1
        return adapter_id

    async def _load(self, adapter_id: str, source: str) -> None:
        path = self._local_path(adapter_id, source)
        try:  # validated before anything is offloaded for it
            config, tensors = await asyncio.to_thread(load_peft_dir, path)
            stacked = await asyncio.to_thread(self.engine.prepare_adapter, adapter_id, tensors, config)
        except eng.EngineError as exc:
            raise generation_error(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - unreadable config or weights
            raise generation_error(f"{type(exc).__name__}: {exc}") from None
        await self._make_room()
        try:
            await self.engine.load_adapter_async(adapter_id, stacked, config)
        except eng.EngineError as exc:
            raise generation_error(str(exc)) from None
        self._active[adapter_id] = str(path)
        self.loads.append(str(path))

    async def _make_room(self) -> None:
        """Offload the least recently used idle adapter while the slots are full; wait while
        every active adapter is in use (LoRAX queues the request, it never fails it)."""
        while len(self._active) >= self.max_active_adapters:
            victim = next((a for a in self._active if self._users[a] <= 0), None)
            if victim is not None:
                try:
                    self.engine.unload_adapter(victim)
                except eng.AdapterInUse:  # an abort the step thread has not processed yet
                    await asyncio.sleep(0.01)
                    continue
                self.offloads.append(self._active.pop(victim))
                continue
            self._freed.clear()
            await self._freed.wait()
