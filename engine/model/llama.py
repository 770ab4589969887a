"""The Llama forward pass over the engine's slot-based KV cache, with multi-LoRA.

Two entry points share one decoder-layer body and differ only in attention:
- ``decode``: one new token for each of the first N slots (rows = slots), attending in place
  over each slot's cached prefix with a length mask;
- ``prefill``: a padded [B, T] chunk of prompt tokens for B sequences in arbitrary slots,
  attending causally over their cached prefix plus the chunk.
Activations are flattened to [tokens, hidden] for every matmul, so LoRA and projections never
care which case they are in.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kernels import BackgroundKernels, Kernel, decode_attention
from ..kv_cache import KVCache
from ..lora.batch import LoraDeltas
from .packed import packed_linear
from .rope import Rope
from .weights import LlamaWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm with its reference numerics: normalize in float32, round to the model
    dtype, then scale (fused bf16 rms_norm drifts far enough to change greedy tokens)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype).mul_(weight)


#: rows x context from which decode attention runs compiled: below, SDPA is as fast (measured
#: on 2 cores: 8 rows x 100 keys 0.94x, 8 x 384 1.0-1.02x, 32 x 100 1.06-1.17x, 8 x 1024 1.10x,
#: 32 x 384 1.14-1.19x decode steps)
_COMPILED_ATTENTION_MIN = 2048

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LlamaModel:
    def __init__(self, weights: LlamaWeights, rope: Rope, cache: KVCache, kernels: BackgroundKernels | None = None,
                 packed: bool = False) -> None:
        self.w = weights
        #: the layer projections' product: oneDNN's on weights ``pack_layers`` packed, else F.linear
        self.linear = packed_linear if packed else F.linear
        #: where decode attention's compiled kernel comes from (None: SDPA always)
        self.kernels = kernels
        self.dims = weights.dims
        self.rope = rope
        self.cache = cache
        d = self.dims
        self.group = d.num_heads // d.num_kv_heads
        self.scale = d.head_dim**-0.5

    # ---- shared body ------------------------------------------------------------------
    def _layers(self, h: torch.Tensor, positions: torch.Tensor, attend: AttentionFn, lora: LoraDeltas | None) -> torch.Tensor:
        d = self.dims
        eps = d.rms_norm_eps
        n = h.shape[0]
        cos, sin = self.rope.tables(positions)
        hd = d.head_dim
        linear = self.linear
        for i, lw in enumerate(self.w.layers):
            x = rms_norm(h, lw.input_norm, eps)
            qkv = linear(x, lw.qkv)
            if lora is not None:
                lora.apply("qkv", i, x, qkv)
            qk = qkv[:, : d.q_size + d.kv_size].view(n, d.num_heads + d.num_kv_heads, hd)
            qk = self.rope.apply(qk, cos, sin)
            q = qk[:, : d.num_heads]
            k = qk[:, d.num_heads :]
            v = qkv[:, d.q_size + d.kv_size :].view(n, d.num_kv_heads, hd)
            attn = attend(i, q, k, v)  # [n, q_size]
            o = linear(attn, lw.o)
            if lora is not None:
                lora.apply("o", i, attn, o)
            h = h + o
            x = rms_norm(h, lw.post_norm, eps)
            gu = linear(x, lw.gate_up)
            if lora is not None:
                lora.apply("gate_up", i, x, gu)
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate) * up
            down = linear(act, lw.down)
            if lora is not None:
                lora.apply("down", i, act, down)
            h = h + down
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = rms_norm(h, self.w.norm, self.dims.rms_norm_eps)
        # [vocab, hidden] @ [hidden, N] runs ~1.5x faster on CPU BLAS than the
        # equivalent F.linear for a tall vocabulary and a few dozen rows.
        return torch.mm(self.w.lm_head, h.t()).t()

    # ---- decode -----------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, ctx_len: int, lora: LoraDeltas | None) -> torch.Tensor:
        """tokens/positions: [N] for slots 0..N-1 (position = index the new token is written at).
        ``ctx_len`` >= max(positions) + 1. Returns the hidden states [N, hidden]."""
        n = tokens.shape[0]
        keys = torch.arange(ctx_len, device=tokens.device)
        mask = (keys[None, :] <= positions[:, None]).view(n, 1, 1, ctx_len)
        kernel = self._attention_kernel(n, ctx_len)
        if kernel is None:
            return self._decode_body(self.w.embed[tokens], positions, mask, lora)
        bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        return self._decode_body(self.w.embed[tokens], positions, mask, lora, kernel, bias)

    def _attention_kernel(self, n: int, ctx: int) -> Kernel | None:
        """The compiled decode attention once it is ready, for 2 rows or more and a batch large
        enough for it to pay. Not over the whole cache: a slice of every position is laid out as
        if contiguous, which the kernel's guards tell apart (a recompile on the step thread)."""
        if self.kernels is None or n < 2 or n * ctx < _COMPILED_ATTENTION_MIN or ctx >= self.cache.k[0].shape[2]:
            return None
        key = ("decode_attention", self.cache.k[0].dtype, self.cache.k[0].device.type)
        # q, k, v, bias: rows free everywhere, the context free in k, v and bias
        return self.kernels.get(key, decode_attention, self._attention_example, ((0, 0), (1, 0), (1, 2), (2, 0), (2, 2), (3, 0), (3, 3)))

    def _attention_example(self) -> list:
        """Arguments laid out as a decode step's: views of the cache, so strides match."""
        d, k, v = self.dims, self.cache.k[0], self.cache.v[0]
        ctx = min(37, k.shape[2])
        n = min(5, k.shape[0])
        n = n - 1 if n == ctx else n  # distinct sizes, so the two stay independent
        q = torch.zeros((n, d.num_kv_heads, self.group, d.head_dim), dtype=k.dtype, device=k.device)
        return [q, k[:n, :, :ctx], v[:n, :, :ctx], torch.zeros((n, 1, 1, ctx), device=k.device), self.scale]

    def _decode_body(
        self, h: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, lora: LoraDeltas | None,
        kernel: Kernel | None = None, bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Sizes come from tensor shapes only, so a compiled version (compile()) treats batch
        # size and context length as dynamic instead of recompiling for each value.
        d = self.dims
        kc, vc = self.cache.k, self.cache.v
        rows = torch.arange(h.shape[0], device=h.device)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            n, ctx = q.shape[0], mask.shape[-1]
            kl, vl = kc[layer], vc[layer]
            kl[rows, :, positions] = k
            vl[rows, :, positions] = v
            qg = q.view(n, d.num_kv_heads, self.group, d.head_dim)
            if kernel is not None:
                out = kernel(qg.contiguous(), kl[:n, :, :ctx], vl[:n, :, :ctx], bias, self.scale)
            else:
                out = F.scaled_dot_product_attention(qg, kl[:n, :, :ctx], vl[:n, :, :ctx], attn_mask=mask, scale=self.scale)
            return out.reshape(n, d.q_size)

        return self._layers(h, positions, attend, lora)

    def compile(self) -> None:
        """torch.compile the decode step (dynamic shapes; inductor keeps its cache on disk)."""
        self._decode_body = torch.compile(self._decode_body, dynamic=True)

    # ---- prefill ----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        tokens: torch.Tensor,  # [B, T] padded
        slots: torch.Tensor,  # [B]
        starts: torch.Tensor,  # [B] tokens already cached for each sequence
        lengths: torch.Tensor,  # [B] valid tokens of this chunk
        lora: LoraDeltas | None,
        fresh: bool,  # every start is 0: attend over the chunk itself, not the cache
    ) -> torch.Tensor:
        """Writes the chunk's keys/values into the cache; returns the hidden state of each row's
        last valid token, [B, hidden] (call ``logits`` on the rows that need a token)."""
        b, t = tokens.shape
        d = self.dims
        dev = tokens.device
        steps = torch.arange(t, device=dev)
        valid = steps[None, :] < lengths[:, None]  # [B, T]
        positions = (starts[:, None] + steps[None, :]).masked_fill(~valid, 0)
        write_slot = torch.where(valid, slots[:, None], self.cache.scratch).reshape(-1)
        write_pos = positions.reshape(-1)
        ctx = t if fresh else int((starts + lengths).max())
        keys = torch.arange(ctx, device=dev)
        qpos = positions if not fresh else steps[None, :].expand(b, t)
        mask = keys[None, None, :] <= qpos[:, :, None]  # causal over absolute positions
        if fresh:
            mask = mask & valid[:, None, :]
        mask = mask.unsqueeze(1)  # [B, 1, T, ctx]
        kc, vc = self.cache.k, self.cache.v

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc[layer][write_slot, :, write_pos] = k
            vc[layer][write_slot, :, write_pos] = v
            qb = q.view(b, t, d.num_heads, d.head_dim).transpose(1, 2)
            if fresh:
                kb = k.view(b, t, d.num_kv_heads, d.head_dim).transpose(1, 2)
                vb = v.view(b, t, d.num_kv_heads, d.head_dim).transpose(1, 2)
            else:
                kb = kc[layer][slots, :, :ctx]
                vb = vc[layer][slots, :, :ctx]
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=self.scale, enable_gqa=True)
            return out.transpose(1, 2).reshape(b * t, d.q_size)

        h = self.w.embed[tokens.reshape(-1)]
        h = self._layers(h, positions.reshape(-1), attend, lora)
        last = (lengths - 1).clamp(min=0)
        return h.view(b, t, -1)[torch.arange(b, device=dev), last]
