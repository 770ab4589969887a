"""Keyword rules: each expert's patterns vote their weight when they occur in the prompt.

A plain pattern matches case-insensitively as a whole word or phrase: ``"math"`` matches
"Math homework" but not "mathematics"; ``"linked list"`` also matches "linked  list". Word
boundaries apply only at ends of the pattern that are word characters, so ``"c++"`` matches
"c++ code" and ``".py"`` matches "main.py". Regex patterns are used as written, with
``IGNORECASE``. Every pattern is compiled once per table; a plain pattern's regex runs only
when its longest word occurs in the prompt as a substring (a ``str`` search is ~30x cheaper
than a bounded regex). A pattern counts once per prompt, however often it occurs.

Confidence is the winner's margin over the runner-up, damped by ``evidence`` pseudo-weight::

    confidence = (top - runner_up) / (top + evidence)

so a lone weight-1 match scores 0.5, two of them 0.67, and a tie scores 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .types import Decision, ExpertTable, Keyword


def compile_keyword(keyword: Keyword) -> re.Pattern[str]:
    """The compiled form of ``keyword``; plain patterns are matched against lower-cased text."""
    if keyword.regex:
        return re.compile(keyword.pattern, re.IGNORECASE)
    text = keyword.pattern.strip().lower()
    body = r"\s+".join(re.escape(part) for part in text.split())
    head = r"(?<!\w)" if re.match(r"\w", text[0]) else ""
    tail = r"(?!\w)" if re.match(r"\w", text[-1]) else ""
    return re.compile(head + body + tail)


@dataclass(frozen=True)
class _Rule:
    expert: int
    keyword: Keyword
    compiled: re.Pattern[str]
    needle: str  # a substring every match contains: a cheap test before the regex ("" for regexes)


class KeywordClassifier:
    """Weighted keyword votes per expert for one :class:`ExpertTable`."""

    method = "keyword"

    def __init__(self, table: ExpertTable, *, evidence: float = 1.0, max_chars: int = 8000) -> None:
        self.table = table
        self.evidence = evidence
        self.max_chars = max_chars
        self._plain: list[_Rule] = []
        self._regex: list[_Rule] = []
        for i, expert in enumerate(table.experts):
            for kw in expert.keywords:
                needle = "" if kw.regex else max(kw.pattern.lower().split(), key=len)
                (self._regex if kw.regex else self._plain).append(_Rule(i, kw, compile_keyword(kw), needle))

    def matches(self, text: str) -> list[list[Keyword]]:
        """For each expert (in table order), the keywords that occur in ``text`` (its first
        ``max_chars`` characters: the scan is linear in them and runs on the event loop)."""
        found: list[list[Keyword]] = [[] for _ in self.table.experts]
        text = text[:self.max_chars]
        lowered = text.lower()
        for rule in self._plain:
            if rule.needle in lowered and rule.compiled.search(lowered) is not None:
                found[rule.expert].append(rule.keyword)
        for rule in self._regex:
            if rule.compiled.search(text) is not None:
                found[rule.expert].append(rule.keyword)
        return found

    def decide(self, text: str) -> Decision:
        """The keyword decision for ``text`` (expert ``None`` when no keyword occurs)."""
        experts = self.table.experts
        found = self.matches(text)
        weights = [float(sum(kw.weight for kw in hits)) for hits in found]
        scores = {e.name: w for e, w in zip(experts, weights)}
        ranked = sorted(range(len(experts)), key=lambda i: weights[i], reverse=True)
        if not ranked or weights[ranked[0]] <= 0:
            return Decision(None, None, self.method, 0.0, scores, "no keyword matched")
        top = weights[ranked[0]]
        runner_up = weights[ranked[1]] if len(ranked) > 1 else 0.0
        confidence = (top - runner_up) / (top + self.evidence)
        winner = experts[ranked[0]]
        matched = "; ".join(
            f"{experts[i].name}: " + ", ".join(f"{kw.pattern!r} ({kw.weight:g})" for kw in found[i])
            for i in ranked if found[i])
        reason = f"keywords matched {matched}"
        return Decision(winner.name, winner.adapter, self.method, confidence, scores, reason)

    async def classify(self, text: str) -> Decision:
        return self.decide(text)
