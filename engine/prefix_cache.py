"""Prompt-prefix KV reuse.

Prompts often share a long prefix (a system prompt, a chat template, few-shot examples). Keys
and values of full 16-token prompt blocks are kept in a small pool, keyed by a hash chain over
(adapter, cache salt, all tokens up to and including the block): the adapter matters since LoRA
changes keys and values, and the salt (the gateway passes the tenant) keeps one tenant from
probing another's prompts through time-to-first-token. The chain is SHA-256, so a collision
cannot hand one prompt another's keys. On admission the longest cached chain is copied into the new sequence's slot
(a memory copy, far cheaper than recomputing), and prefill starts after it. The pool is an
LRU of blocks with a fixed size, allocated once.
"""
from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Sequence

import torch

from .kv_cache import KVCache

BLOCK = 16


class PrefixCache:
    def __init__(self, cache: KVCache, blocks: int) -> None:
        self.cache = cache
        self.capacity = blocks
        k0 = cache.k[0]
        shape = (blocks, k0.shape[1], BLOCK, k0.shape[3])  # [blocks, kv_heads, BLOCK, head_dim]
        self.k = [torch.empty(shape, dtype=k0.dtype, device=k0.device) for _ in cache.k]
        self.v = [torch.empty(shape, dtype=k0.dtype, device=k0.device) for _ in cache.v]
        self._index: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # chain hash -> block
        self._free = list(range(blocks))
        self.hits = 0  # prompt tokens served from the pool
        self.lookups = 0

    @staticmethod
    def _chain(namespace: str, tokens: Sequence[int], n_blocks: int) -> list[bytes]:
        keys, h = [], hashlib.sha256(namespace.encode()).digest()
        for b in range(n_blocks):
            block = array.array("q", tokens[b * BLOCK : (b + 1) * BLOCK]).tobytes()
            h = hashlib.sha256(h + block).digest()
            keys.append(h)
        return keys

    def _touch(self, keys: list[bytes]) -> None:
        # deepest first, so eviction takes a chain's tail before the blocks it hangs from
        for key in reversed(keys):
            self._index.move_to_end(key)

    def restore(self, slot: int, namespace: str, prompt: Sequence[int]) -> int:
        """Copy the longest cached prefix of ``prompt`` into ``slot``; returns its length (always
        leaves at least one prompt token to compute, whose logits give the first token)."""
        self.lookups += 1
        found: list[bytes] = []
        for key in self._chain(namespace, prompt, (len(prompt) - 1) // BLOCK):
            if key not in self._index:
                break
            found.append(key)
        if not found:
            return 0
        self._touch(found)
        blocks = [self._index[key] for key in found]
        n = len(blocks) * BLOCK
        idx = torch.tensor(blocks, device=self.k[0].device)
        for dst, pool in ((self.cache.k, self.k), (self.cache.v, self.v)):
            for layer_dst, layer_pool in zip(dst, pool):
                # [n_blocks, heads, BLOCK, dim] -> [heads, n_blocks * BLOCK, dim]
                layer_dst[slot, :, :n] = layer_pool[idx].transpose(0, 1).reshape(layer_pool.shape[1], n, -1)
        self.hits += n
        return n

    def store(self, slot: int, namespace: str, prompt: Sequence[int]) -> None:
        """Keep the full prompt blocks of a sequence whose prompt is entirely in ``slot``."""
        keys = self._chain(namespace, prompt, len(prompt) // BLOCK)
        self._touch([k for k in keys if k in self._index])
        for b, key in enumerate(keys):
            if key in self._index:
                continue
            block = self._take()
            if block is None:
                return
            span = slice(b * BLOCK, (b + 1) * BLOCK)
            for src, pool in ((self.cache.k, self.k), (self.cache.v, self.v)):
                for layer_src, layer_pool in zip(src, pool):
                    layer_pool[block] = layer_src[slot, :, span]
            self._index[key] = block

    def _take(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._index:
            return None
        _, block = self._index.popitem(last=False)  # least recently used
        return block
