"""A backend that produces tokens instantly (or after a delay per token) with real slot, queue
and adapter bookkeeping: it measures the gateway's own overhead and lets the API tests run
without a model. It honours max_tokens, stop strings, the context limit and the queue bound
exactly like a real backend, so the contract suite holds for it too.

As a model of a real engine for dispatch tests and benchmarks, a token can also take longer
the more sequences run (``token_delay_per_seq_s`` per running sequence, as a batched decode
step does), and an adapter load can take ``load_delay_s`` during which every running sequence
stalls (as the engine's copy into a slot does between two steps), and the first token can come
``first_token_delay_s`` after the request's acceptance (a long prefill).

It honours every sampling extension (``base.EXTENSIONS``) as far as text without a model can:
``ignore_eos`` and ``min_tokens`` set the length, the others leave its words as they are. It
has no tokenizer: ``tokenize`` is Unsupported."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapters.lora import LoraConfig

from .base import EXTENSIONS, BackendChunk, BackendRequest, Capacity, Health, Message, Tokens
from .errors import AdapterProblem, BackendOverloaded, BackendUnavailable, BadRequest, ContextTooLong, Unsupported

WORD = "tok"
#: the shape of the default model (SmolLM2-135M), so adapters for it validate on this backend
#: as on the real one without any checkpoint at hand
SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192}
KNOWN_MODELS = {"smollm2-135m-instruct": SMOLLM2_135M}


def model_config_of(model: str) -> dict[str, Any] | None:
    """The config the null backend reports for ``model``: a Hugging Face checkpoint directory's
    own ``config.json``, the built-in shape of a known model name, else none (uploads are then
    refused, as the gateway cannot check adapters against an unknown model)."""
    config_file = Path(model).expanduser() / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text())
    known = KNOWN_MODELS.get(model)
    return dict(known) if known is not None else None


class NullBackend:
    def __init__(self, *, model: str = "null", tokens: int = 16, token_delay_s: float = 0.0, max_num_seqs: int = 32,
                 max_queue: int = 256, max_model_len: int = 2048, max_loras: int = 16, max_lora_rank: int = 16,
                 name: str = "null", model_config: dict[str, Any] | None = None, token_delay_per_seq_s: float = 0.0,
                 load_delay_s: float = 0.0, first_token_delay_s: float = 0.0,
                 extensions: Iterable[str] | None = None) -> None:
        self.name = name
        #: all by default; fewer to stand in for a backend kind that honours fewer
        self.extensions = EXTENSIONS if extensions is None else frozenset(extensions) & EXTENSIONS
        self.first_token_delay_s = first_token_delay_s
        self.token_delay_per_seq_s = token_delay_per_seq_s
        self.load_delay_s = load_delay_s
        self._stalled_until = 0.0  # loop time until which a load holds every sequence
        self.loads = 0
        self._model_config = model_config
        self.model = model
        self.tokens = tokens
        self.token_delay_s = token_delay_s
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self._running = False
        self._slots: asyncio.Semaphore | None = None
        self._active = 0
        self._waiting = 0
        self._adapters: dict[str, LoraConfig] = {}
        self._loading: set[str] = set()
        self._users: collections.Counter[str] = collections.Counter()
        self._aborted: set[str] = set()

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.max_num_seqs)
        self._running = True

    async def close(self) -> None:
        self._running = False

    @staticmethod
    def count_tokens(request: BackendRequest) -> int:
        if request.prompt_token_ids is not None:
            return len(request.prompt_token_ids)
        if request.messages is not None:
            return sum(len(m.content.split()) + 4 for m in request.messages) + 2
        return len((request.prompt or "").split())

    async def generate(self, request: BackendRequest) -> AsyncIterator[BackendChunk]:
        if not self._running or self._slots is None:
            raise BackendUnavailable("the null backend is not running")
        s = request.sampling
        if s.max_tokens is None:
            s = dataclasses.replace(s, max_tokens=self.tokens)
            request = dataclasses.replace(request, sampling=s)
        if s.max_tokens < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {s.max_tokens}", param="max_tokens")
        prompt_tokens = self.count_tokens(request)
        if prompt_tokens == 0:
            raise BadRequest("the prompt is empty", param="prompt")
        if prompt_tokens + s.max_tokens > self.max_model_len:
            raise ContextTooLong(f"prompt of {prompt_tokens} tokens plus max_tokens {s.max_tokens} exceeds the "
                                 f"context length {self.max_model_len}", param="max_tokens")
        adapter = request.adapter_id
        if adapter is not None and adapter not in self._adapters:
            raise AdapterProblem(f"adapter {adapter!r} is not loaded", adapter, "not_found")
        if self._active >= self.max_num_seqs and self._waiting >= self.max_queue:
            raise BackendOverloaded(f"{self._waiting} requests already waiting (max_queue {self.max_queue})")
        if s.min_tokens > s.max_tokens:
            raise BadRequest(f"min_tokens {s.min_tokens} exceeds max_tokens {s.max_tokens}", param="min_tokens")
        if adapter is not None:
            self._users[adapter] += 1
        loop = asyncio.get_running_loop()
        slot = self._slots
        acquired = False
        self._waiting += 1
        try:
            try:
                if not slot.locked():  # a free slot is taken at once and the clock starts, as in an engine
                    acquired = await slot.acquire()
                    self._waiting, self._active = self._waiting - 1, self._active + 1
                origin = loop.time()
                yield BackendChunk("", prompt_tokens, 0)  # accepted
                if not acquired:
                    acquired = await slot.acquire()
                    self._waiting, self._active = self._waiting - 1, self._active + 1
                    origin = loop.time()
            except BaseException:
                if not acquired:
                    self._waiting -= 1
                raise
            async for chunk in self._tokens(request, prompt_tokens, origin):
                yield chunk
        finally:
            self._aborted.discard(request.request_id)
            if acquired:
                self._active -= 1
                slot.release()
            if adapter is not None:
                self._users[adapter] -= 1
                if not self._users[adapter]:
                    del self._users[adapter]

    async def _tokens(self, request: BackendRequest, prompt_tokens: int, origin: float
                      ) -> AsyncIterator[BackendChunk]:
        """Tokens paced from ``origin`` (loop time), when the request took its slot."""
        s = request.sampling
        n = s.max_tokens if s.ignore_eos else min(s.max_tokens, max(self.tokens, s.min_tokens))
        text_so_far = ""
        loop = asyncio.get_running_loop()
        due = origin + self.first_token_delay_s
        if self.first_token_delay_s:
            await asyncio.sleep(max(0.0, due - loop.time()))
        paced = bool(self.token_delay_s or self.token_delay_per_seq_s or self.load_delay_s)
        for i in range(1, n + 1):
            if paced:
                # each token is due one step after the last whatever the consumer does, like a real
                # engine stepping on its own (a slow consumer catches up without further sleeps);
                # a step takes longer with more sequences, and waits for a load in progress
                due = max(due + self.token_delay_s + self.token_delay_per_seq_s * self._active, self._stalled_until)
                await asyncio.sleep(max(0.0, due - loop.time()))
            if request.request_id in self._aborted:
                yield BackendChunk("", prompt_tokens, i - 1, "abort")
                return
            piece = WORD if i == 1 else " " + WORD
            text_so_far += piece
            hit = next((stop for stop in s.stop if stop in text_so_far), None)
            if hit is not None:
                cut = text_so_far.index(hit)
                yield BackendChunk(piece[: max(0, len(piece) - (len(text_so_far) - cut))], prompt_tokens, i, "stop")
                return
            reason = None if i < n else ("length" if n == s.max_tokens else "stop")
            yield BackendChunk(piece, prompt_tokens, i, reason)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def tokenize(self, *, prompt: str | None = None, messages: Sequence[Message] | None = None,
                       add_special_tokens: bool = False, add_generation_prompt: bool = True,
                       with_strings: bool = False) -> Tokens:
        raise Unsupported("the null backend has no tokenizer")

    async def detokenize(self, ids: Sequence[int]) -> str:
        raise Unsupported("the null backend has no tokenizer")

    def adapter_layout(self) -> str:
        return ""

    def prepare_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> Mapping[str, Any]:
        if config.rank > self.max_lora_rank:
            raise AdapterProblem(f"adapter {adapter_id!r}: rank {config.rank} exceeds max_lora_rank "
                                 f"{self.max_lora_rank}", adapter_id, "rank_too_large")
        return tensors

    async def load_adapter(self, adapter_id: str, tensors: Mapping[str, Any], config: LoraConfig) -> None:
        if adapter_id in self._adapters or adapter_id in self._loading:
            raise AdapterProblem(f"adapter {adapter_id!r} is already loaded", adapter_id, "exists")
        self.prepare_adapter(adapter_id, tensors, config)
        if len(self._adapters) + len(self._loading) >= self.max_loras:
            raise AdapterProblem(f"cannot load adapter {adapter_id!r}: all {self.max_loras} adapter slots are in use",
                                 adapter_id, "slots_full")
        self.loads += 1
        if self.load_delay_s:  # the slot is taken while the copy runs; the adapter serves after it
            self._loading.add(adapter_id)
            try:
                loop = asyncio.get_running_loop()
                self._stalled_until = max(self._stalled_until, loop.time()) + self.load_delay_s
                await asyncio.sleep(self._stalled_until - loop.time())
            finally:
                self._loading.discard(adapter_id)
        self._adapters[adapter_id] = config

    async def unload_adapter(self, adapter_id: str) -> None:
        if adapter_id not in self._adapters:
            raise AdapterProblem(f"adapter {adapter_id!r} is not loaded", adapter_id, "not_found")
        if self._users.get(adapter_id):
            raise AdapterProblem(f"adapter {adapter_id!r} is used by {self._users[adapter_id]} request(s); "
                                 "unload refused", adapter_id, "in_use")
        del self._adapters[adapter_id]

    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def health(self) -> Health:
        return Health(ok=self._running, model=self.model, max_model_len=self.max_model_len, detail="null")

    async def model_config(self) -> dict[str, Any] | None:
        return self._model_config

    def capacity(self) -> Capacity:
        return Capacity(self.max_num_seqs - self._active, self.max_loras - len(self._adapters) - len(self._loading),
                        self._waiting, self.max_num_seqs, self.max_loras, self.max_lora_rank)
