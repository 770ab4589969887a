"""Next-token choice per row: greedy rows share one batched max; sampled rows apply their own
temperature, top-k and top-p and draw from their own generator (seeded requests repeat).
Before that, rows that ask for it have their logits adjusted in place: a repetition penalty
(HF/vLLM semantics: a seen token's positive logit divided by the penalty, a negative one
multiplied) and tokens forbidden for now (end-of-sequence before ``min_tokens``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import SamplingParams


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature <= 0.0 or p.top_k == 1


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """logits: [N, vocab] for N rows; returns one token id per row."""
    greedy = logits.max(dim=-1).indices.tolist()
    for i, p in enumerate(params):
        if not is_greedy(p):
            greedy[i] = _draw(logits[i], p, generators[i])
    return greedy


def _draw(row: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    x = row.float() / p.temperature
    if p.top_k > 0 and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1).
        drop = probs.cumsum(-1) - probs >= p.top_p
        x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def needs_adjusting(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.min_tokens > 0


def penalize(row: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """``row``: one row of logits, changed in place; ``seen``: a boolean vocabulary mask."""
    penalized = torch.where(row > 0, row / penalty, row * penalty)
    row.copy_(torch.where(seen, penalized, row))


def forbid(row: torch.Tensor, token_ids: Sequence[int]) -> None:
    if token_ids:
        row[list(token_ids)] = float("-inf")
