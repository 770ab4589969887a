"""One engine iteration: admit waiting sequences to free slots, run a chunk of batched prefill,
then one decode step for every generating sequence. Runs only on the engine's step thread.

Continuous batching: sequences join at every iteration and leave as soon as they finish or are
aborted. Prefill is bounded by ``prefill_chunk_tokens`` per iteration (long prompts are split
over several), so decoding sequences keep producing a token every iteration.
"""
from __future__ import annotations

import collections
import heapq
from collections.abc import Callable

import torch

from .kv_cache import KVCache
from .lora import LoraSlots
from .model.llama import LlamaModel
from .prefix_cache import PrefixCache
from .sampling import forbid, needs_adjusting, penalize, sample
from .sequence import Phase, Sequence
from .tokenizer import Tokenizer
from .types import FinishReason, GenerationChunk

Emit = Callable[[Sequence, GenerationChunk], None]


class Scheduler:
    def __init__(
        self,
        model: LlamaModel,
        cache: KVCache,
        lora: LoraSlots,
        tokenizer: Tokenizer,
        prefill_chunk_tokens: int,
        device: torch.device,
        on_finish: Callable[[Sequence], None],
        prefixes: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.lora = lora
        self.tokenizer = tokenizer
        self.chunk_tokens = prefill_chunk_tokens
        self.device = device
        self.on_finish = on_finish
        self.prefixes = prefixes
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.by_id: dict[str, Sequence] = {}
        self._free = list(range(cache.slots))
        heapq.heapify(self._free)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ---- membership ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.by_id[seq.request_id] = seq

    def abort(self, request_id: str, emit: Emit) -> None:
        seq = self.by_id.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.ABORT, emit, text=seq.stops.flush())

    def abort_all(self, emit: Emit) -> None:
        for rid in list(self.by_id):
            self.abort(rid, emit)

    def _admit(self) -> None:
        while self.waiting and self._free:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free)
            self.cache.prepare(seq.slot)
            seq.phase = Phase.PREFILL
            self.running[seq.slot] = seq
            if self.prefixes is not None:
                seq.computed = self.prefixes.restore(seq.slot, self._namespace(seq), seq.prompt_ids)

    def _namespace(self, seq: Sequence) -> str:
        slot = seq.adapter_slot
        version = self.lora.version(slot) if slot >= 0 else 0
        return f"{slot}:{version}:{seq.request.cache_salt}"

    def _adjust(self, seq: Sequence, row: torch.Tensor) -> None:
        p = seq.request.sampling
        if p.repetition_penalty != 1.0:
            if seq.seen is None:
                seq.seen = torch.zeros(row.shape[-1], dtype=torch.bool, device=row.device)
                seq.seen[torch.tensor(seq.prompt_ids + seq.output_ids, device=row.device)] = True
            penalize(row, seq.seen, p.repetition_penalty)
        if len(seq.output_ids) < p.min_tokens:
            forbid(row, [*p.stop_token_ids, *(() if p.ignore_eos else self.tokenizer.eos_ids)])

    def _finish(self, seq: Sequence, reason: FinishReason, emit: Emit, text: str = "", token: int | None = None) -> None:
        if seq.phase is Phase.DONE:
            return
        if seq.phase is Phase.WAITING:
            self.waiting.remove(seq)
        else:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)
        seq.phase = Phase.DONE
        del self.by_id[seq.request_id]
        emit(seq, self._chunk(seq, text, token, reason))
        self.on_finish(seq)

    @staticmethod
    def _chunk(seq: Sequence, text: str, token: int | None, reason: FinishReason | None) -> GenerationChunk:
        return GenerationChunk(
            request_id=seq.request_id,
            text=text,
            token_ids=() if token is None else (token,),
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.output_ids),
            finish_reason=reason,
        )

    # ---- one iteration ------------------------------------------------------------------
    def step(self, emit: Emit) -> None:
        self._admit()
        self._prefill(emit)
        self._decode(emit)

    def _prefill(self, emit: Emit) -> None:
        batch: list[tuple[Sequence, int]] = []
        budget = self.chunk_tokens
        # running is in admission order, and admission is first come, first served
        for seq in (s for s in self.running.values() if s.phase is Phase.PREFILL):
            if budget <= 0:
                break
            n = min(seq.prompt_len - seq.computed, budget)
            batch.append((seq, n))
            budget -= n
        if not batch:
            return
        width = max(n for _, n in batch)
        tokens = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (seq, n) in enumerate(batch):
            tokens[row, :n] = torch.tensor(seq.prompt_ids[seq.computed : seq.computed + n])
        starts = [seq.computed for seq, _ in batch]
        token_slots = [seq.adapter_slot for seq, n in batch for _ in range(width)]
        dev = self.device
        hidden = self.model.prefill(
            tokens.to(dev),
            torch.tensor([seq.slot for seq, _ in batch], device=dev),
            torch.tensor(starts, device=dev),
            torch.tensor([n for _, n in batch], device=dev),
            self.lora.batch(token_slots),
            fresh=not any(starts),
        )
        done = []
        for row, (seq, n) in enumerate(batch):
            seq.computed += n
            if seq.computed == seq.prompt_len:
                done.append(row)
                if self.prefixes is not None:
                    self.prefixes.store(seq.slot, self._namespace(seq), seq.prompt_ids)
        if done:
            rows = [batch[r][0] for r in done]
            logits = self.model.logits(hidden[torch.tensor(done, device=dev)])
            self._accept(rows, logits, emit)

    def _decode(self, emit: Emit) -> None:
        rows = [s for s in self.running.values() if s.phase is Phase.DECODE]
        if not rows:
            return
        n = max(s.slot for s in rows) + 1
        tokens = [0] * n
        positions = [0] * n
        token_slots = [-1] * n
        for slot in range(n):
            seq = self.running.get(slot)
            if seq is not None:
                positions[slot] = seq.computed  # prefill rows: a position their next chunk rewrites
        for s in rows:
            tokens[s.slot] = s.next_token
            token_slots[s.slot] = s.adapter_slot
        dev = self.device
        ctx = max(positions[s.slot] for s in rows) + 1
        hidden = self.model.decode(
            torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), ctx, self.lora.batch(token_slots)
        )
        for s in rows:
            s.computed += 1
        if len(rows) == n:
            logits = self.model.logits(hidden)
            rows.sort(key=lambda s: s.slot)
        else:
            rows.sort(key=lambda s: s.slot)
            logits = self.model.logits(hidden[torch.tensor([s.slot for s in rows], device=dev)])
        self._accept(rows, logits, emit)

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor, emit: Emit) -> None:
        for i, seq in enumerate(seqs):
            if needs_adjusting(seq.request.sampling):
                self._adjust(seq, logits[i])
        tokens = sample(logits, [s.request.sampling for s in seqs], [s.generator for s in seqs])
        eos = self.tokenizer.eos_ids
        for seq, tok in zip(seqs, tokens):
            seq.output_ids.append(tok)
            params = seq.request.sampling
            if seq.seen is not None:
                seq.seen[tok] = True
            ending = len(seq.output_ids) > params.min_tokens  # may it stop here?
            if ending and ((tok in eos and not params.ignore_eos) or tok in params.stop_token_ids):
                self._finish(seq, FinishReason.STOP, emit, text=seq.stops.flush(), token=tok)
                continue
            piece = seq.detok.step(self.tokenizer.backend, tok) or ""
            text, hit = seq.stops.feed(piece, ending)
            if hit:
                self._finish(seq, FinishReason.STOP, emit, text=text, token=tok)
            elif len(seq.output_ids) >= params.max_tokens:
                self._finish(seq, FinishReason.LENGTH, emit, text=text + seq.stops.flush(), token=tok)
            else:
                seq.phase = Phase.DECODE
                emit(seq, self._chunk(seq, text, tok, None))

