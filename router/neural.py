"""Sentence-embedding classifier: nearest centroid by cosine similarity.

Each expert's centroid is the normalised mean of the embeddings of its examples, its
description and (optionally) its plain keywords joined into one phrase; an expert with none
of these is represented by its name. A prompt's scores are ``softmax(cos / temperature)``
over the experts and its confidence is the top probability.

Fitting embeds every text of the table once (through the encoder's worker thread, off the
event loop); :class:`NeuralClassifier` fits lazily, once, shared by concurrent callers. The
hybrid router keeps one classifier per tenant and table fingerprint.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from .encoder import Encoder
from .types import Decision, Expert, ExpertTable

__all__ = ["CentroidHead", "Encoder", "NeuralClassifier", "expert_texts"]


def expert_texts(expert: Expert, *, include_keywords: bool = True) -> list[str]:
    """The texts whose embeddings make up ``expert``'s centroid."""
    texts = list(expert.examples)
    if expert.description.strip():
        texts.append(expert.description)
    plain = [kw.pattern for kw in expert.keywords if not kw.regex]
    if include_keywords and plain:
        texts.append(", ".join(plain))
    return texts or [expert.name]


class CentroidHead:
    """Fitted centroids ``[k, d]`` of a table's experts (pure tensor math, no encoder)."""

    method = "neural"

    def __init__(self, table: ExpertTable, centroids: torch.Tensor, temperature: float) -> None:
        if centroids.ndim != 2 or centroids.shape[0] != len(table.experts):
            raise ValueError(f"centroids {tuple(centroids.shape)} do not fit {len(table.experts)} experts")
        if temperature <= 0:
            raise ValueError(f"temperature {temperature} must be positive")
        self.table = table
        self.centroids = centroids
        self.temperature = temperature

    @classmethod
    def from_embeddings(cls, table: ExpertTable, per_expert: Sequence[torch.Tensor],
                        temperature: float) -> CentroidHead:
        """A head from each expert's text embeddings (``[n_i, d]``, unit norm)."""
        means = torch.stack([e.mean(0) for e in per_expert]) if per_expert else torch.empty(0, 0)
        return cls(table, torch.nn.functional.normalize(means, dim=-1), temperature)

    def similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``[..., k]`` of unit-norm embeddings to the centroids."""
        return embeddings @ self.centroids.T

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.similarities(embeddings) / self.temperature, dim=-1)

    def decide(self, embedding: torch.Tensor, probabilities: torch.Tensor | None = None,
               note: str = "") -> Decision:
        """The decision for one embedding ``[d]`` (or for given ``probabilities``)."""
        experts = self.table.experts
        if not experts:
            return Decision(None, None, self.method, 0.0, {}, "the table has no experts")
        probs = self.probabilities(embedding) if probabilities is None else probabilities
        sims = self.similarities(embedding)
        best = int(torch.argmax(probs))
        scores = {e.name: float(p) for e, p in zip(experts, probs)}
        winner = experts[best]
        reason = (f"nearest centroid {winner.name!r} (cosine {float(sims[best]):.3f}, "
                  f"p={float(probs[best]):.3f}){note}")
        return Decision(winner.name, winner.adapter, self.method, float(probs[best]), scores, reason)


class NeuralClassifier:
    """The centroid head of one table, fitted on first use through ``encoder``."""

    method = "neural"

    def __init__(self, encoder: Encoder, table: ExpertTable, *, temperature: float = 0.05,
                 include_keywords: bool = True) -> None:
        self.encoder = encoder
        self.table = table
        self.temperature = temperature
        self.include_keywords = include_keywords
        self._head: CentroidHead | None = None
        self._fitting: asyncio.Task[CentroidHead] | None = None

    async def head(self) -> CentroidHead:
        """The fitted head; concurrent first callers share one fit, a failed fit is retried."""
        if self._head is not None:
            return self._head
        if self._fitting is None:
            self._fitting = asyncio.get_running_loop().create_task(self._fit(), name="router-fit")
        fitting = self._fitting
        try:
            self._head = await asyncio.shield(fitting)
        except Exception:
            if self._fitting is fitting and fitting.done():
                self._fitting = None
            raise
        return self._head

    async def _fit(self) -> CentroidHead:
        groups = [expert_texts(e, include_keywords=self.include_keywords) for e in self.table.experts]
        flat = [text for group in groups for text in group]
        embeddings = await self.encoder.embed_many(flat)
        sizes = [len(group) for group in groups]
        per_expert = list(torch.split(embeddings, sizes)) if sizes else []
        return CentroidHead.from_embeddings(self.table, per_expert, self.temperature)

    async def classify(self, text: str) -> Decision:
        head = await self.head()
        return head.decide(await self.encoder.embed(text))
