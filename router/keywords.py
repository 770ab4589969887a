"""Keyword rules: each expert's patterns vote their weight when they occur in the prompt.

Patterns are tenant input and the scan runs on the event loop, so every pattern is matched by
RE2 (see :func:`router.types.compile_pattern`): the time is linear in the prompt whatever the
pattern, where a backtracking ``re`` could spend seconds on one crafted regex and stall every
tenant's requests.

A plain pattern matches case-insensitively as a whole word or phrase: ``"math"`` matches
"Math homework" but not "mathematics"; ``"linked list"`` also matches "linked  list". Word
boundaries apply only at ends of the pattern that are word characters, so ``"c++"`` matches
"c++ code" and ``".py"`` matches "main.py". Word characters are Python's (letters, digits and
``_`` of every script: "café" does not match "cafés"), not RE2's ASCII ``\\b``: the lower-cased
prompt gets a marker at each of its word edges (:func:`with_edges`, one linear pass of the fixed
pattern ``\\b``) and a plain pattern's words carry the same markers, which keeps each pattern a
few RE2 instructions long (a Unicode word class costs ~1,300, and ~0.5 ms to compile, per use).
Regex patterns are RE2 syntax, used as written, case-insensitive. Every pattern is compiled once
per table; a plain pattern's regex runs only when its longest word occurs in the prompt as a
substring (a ``str`` search is much cheaper than a regex). A pattern counts once per prompt,
however often it occurs.

Confidence is the winner's margin over the runner-up, damped by ``evidence`` pseudo-weight::

    confidence = (top - runner_up) / (top + evidence)

so a lone weight-1 match scores 0.5, two of them 0.67, and a tie scores 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import re2

from .types import Decision, ExpertTable, Keyword, compile_pattern

EDGE = "\x00"
_WORD_EDGE = re.compile(r"\b")  # Python's Unicode word boundary; a fixed pattern, never backtracks
#: one or more of exactly the characters ``str.split()`` splits on (RE2's ``\s`` is ASCII-only)
_SPACE = r"[\t-\r\x{1c}-\x{20}\x{85}\pZ]+"


def with_edges(text: str) -> str:
    """``text`` with :data:`EDGE` at each boundary between a word character and a non-word
    character or an end. An ``EDGE`` already in ``text`` becomes U+FFFD, which is no word
    character either, so only the markers are ``EDGE``."""
    return _WORD_EDGE.sub(EDGE, text.replace(EDGE, "\ufffd"))


def plain_source(pattern: str) -> str:
    """The RE2 source of a plain pattern, to match against ``with_edges(text.lower())``: its
    words with their edges marked, separated by any run of whitespace."""
    return _SPACE.join(re2.escape(with_edges(word)) for word in pattern.lower().split())


def compile_keyword(keyword: Keyword) -> re2._Regexp:
    """The compiled form of ``keyword``: a regex as written, to match against the prompt's
    UTF-8; a plain pattern per :func:`plain_source`."""
    return compile_pattern(keyword.pattern if keyword.regex else plain_source(keyword.pattern))


def utf8(text: str) -> bytes:
    """What RE2 scans. A lone surrogate (which no UTF-8 can hold) becomes U+FFFD."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


@dataclass(frozen=True)
class _Rule:
    expert: int
    keyword: Keyword
    compiled: re2._Regexp
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
        edged: bytes | None = None  # marked only when some needle occurs
        for rule in self._plain:
            if rule.needle in lowered:
                if edged is None:
                    edged = utf8(with_edges(lowered))
                if rule.compiled.search(edged) is not None:
                    found[rule.expert].append(rule.keyword)
        if self._regex:
            raw = utf8(text)
            for rule in self._regex:
                if rule.compiled.search(raw) is not None:
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
