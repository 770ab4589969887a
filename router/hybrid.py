"""The hybrid router: keyword rules first, then the sentence-embedding classifier, then the
table's default expert (or the base model).

Policy, for one prompt:

1. keyword decision with confidence >= ``keyword_threshold``: it wins, and the prompt is
   never encoded (the fast path: a thread hop and well under a millisecond of matching);
2. otherwise the neural probabilities, optionally blended with the keyword vote shares
   (``p = (1 - blend) * p_neural + blend * p_keyword``); top probability >=
   ``neural_threshold``: that expert (method ``"neural"``);
3. otherwise the default expert (method ``"default"``), or the base model (expert and adapter
   ``None``) when the table has no default.

The defaults of :class:`RouterConfig` were tuned by ``python -m loadtests.bench_router``
(cross-validated on the train split of ``router/eval``; the test split was not used).

Per tenant, the router keeps the compiled keyword rules and the fitted centroid head of the
tenant's current table, keyed by the table's fingerprint: a changed table is refitted, an
unchanged one never is. At most ``cache_size`` tenants are kept (least recently used go).
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .encoder import Encoder
from .keywords import KeywordClassifier
from .neural import CentroidHead, NeuralClassifier
from .types import Decision, ExpertTable


@dataclass(frozen=True)
class RouterConfig:
    keyword_threshold: float = 0.4
    neural_threshold: float = 0.5
    temperature: float = 0.02
    evidence: float = 2.0  # keyword pseudo-weight that damps confidence (see keywords.py)
    blend: float = 0.0  # share of the keyword votes in the neural stage (0: not blended)
    include_keywords: bool = True  # keyword phrase as one more text of each centroid
    cache_size: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.blend <= 1:
            raise ValueError(f"blend {self.blend} is not in [0, 1]")
        if self.cache_size < 1:
            raise ValueError(f"cache_size {self.cache_size} must be at least 1")


def keyword_wins(keyword: Decision, config: RouterConfig) -> bool:
    return keyword.expert is not None and keyword.confidence >= config.keyword_threshold


def after_keywords(table: ExpertTable, keyword: Decision, head: CentroidHead,
                   embedding: torch.Tensor, config: RouterConfig) -> Decision:
    """Steps 2 and 3 of the policy, for a prompt whose keyword decision did not win."""
    if not table.experts:
        return fallback(table, keyword, config)
    probs = head.probabilities(embedding)
    note = ""
    votes = torch.tensor([keyword.scores.get(e.name, 0.0) for e in table.experts])
    if config.blend > 0 and float(votes.sum()) > 0:
        probs = (1 - config.blend) * probs + config.blend * votes / votes.sum()
        note = f"; blended {config.blend:g} with keyword votes ({keyword.reason})"
    neural = head.decide(embedding, probs, note)
    if neural.confidence >= config.neural_threshold:
        return neural
    return fallback(table, neural, config)


def fallback(table: ExpertTable, basis: Decision, config: RouterConfig) -> Decision:
    """The default expert, or the base model, when no classifier is confident enough."""
    expert = table.expert(table.default)
    target = f"default expert {expert.name!r}" if expert else "the base model (no default expert)"
    reason = f"{basis.reason}; confidence {basis.confidence:.3f} < {config.neural_threshold:g}: {target}"
    return Decision(expert.name if expert else None, expert.adapter if expert else None, "default",
                    basis.confidence, basis.scores, reason)


@dataclass(frozen=True)
class _Entry:
    fingerprint: str
    keyword: KeywordClassifier
    neural: NeuralClassifier


class Router:
    """Routes a tenant's prompt to one of the experts of its table.

    The router owns ``encoder`` and closes it in :meth:`close` unless ``close_encoder`` is
    false (e.g. when several routers share one encoder)."""

    def __init__(self, encoder: Encoder, config: RouterConfig | None = None, *,
                 close_encoder: bool = True) -> None:
        self.encoder = encoder
        self.config = config or RouterConfig()
        self._close_encoder = close_encoder
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.fits = 0  # tables compiled and fitted (cache misses)

    def stale(self, tenant: str, table: ExpertTable) -> bool:
        entry = self._entries.get(tenant)
        return entry is None or entry.fingerprint != table.fingerprint

    def classifiers(self, tenant: str, table: ExpertTable, keywords: KeywordClassifier | None = None
                    ) -> tuple[KeywordClassifier, NeuralClassifier]:
        """The tenant's classifiers for ``table``: cached while the table is unchanged.
        ``keywords``: the table's keyword rules, already compiled (elsewhere than the event loop)."""
        fingerprint = table.fingerprint
        entry = self._entries.get(tenant)
        if entry is None or entry.fingerprint != fingerprint:
            cfg = self.config
            if keywords is None or keywords.table is not table:
                keywords = KeywordClassifier(table, evidence=cfg.evidence)
            entry = _Entry(fingerprint, keywords,
                           NeuralClassifier(self.encoder, table, temperature=cfg.temperature,
                                            include_keywords=cfg.include_keywords))
            self._entries[tenant] = entry
            self.fits += 1
            while len(self._entries) > cfg.cache_size:
                self._entries.popitem(last=False)
        self._entries.move_to_end(tenant)
        return entry.keyword, entry.neural

    async def route(self, tenant: str, table: ExpertTable, text: str) -> Decision:
        """Keyword rules first (compiled on a table's first use and matched in a worker thread:
        a tenant's patterns, however costly within their limits, never hold up the event loop;
        RE2 releases the GIL while it scans), then the neural head."""
        compiled = None
        if self.stale(tenant, table):
            compiled = await asyncio.to_thread(KeywordClassifier, table, evidence=self.config.evidence)
        keywords, neural = self.classifiers(tenant, table, compiled)
        keyword = await asyncio.to_thread(keywords.decide, text)
        if keyword_wins(keyword, self.config):
            return keyword
        head = await neural.head()
        embedding = await self.encoder.embed(text)
        return after_keywords(table, keyword, head, embedding, self.config)

    async def close(self) -> None:
        self._entries.clear()
        if self._close_encoder:
            await self.encoder.aclose()
