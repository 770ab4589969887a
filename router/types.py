"""Value types of the router: a tenant's expert table and a routing decision.

An :class:`ExpertTable` is what a tenant uploads (JSON)::

    {"default": "general",
     "experts": [{"name": "code", "adapter": "code-lora", "description": "...",
                  "keywords": [{"pattern": "python", "weight": 1.0, "regex": false}],
                  "examples": ["Write a function that ..."]}]}

Every type validates itself on construction and raises :class:`InvalidExpertTable` (a
``ValueError``) naming the offending field. Limits bound the work a table can cause per
request: at most 32 experts, 200 keywords and 200 examples per expert, 2,000 characters per
example. Regex keywords are tenant-supplied patterns run by Python's backtracking ``re``; the
length limit keeps them small, but a pathological pattern can still be slow.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from .errors import InvalidExpertTable

MAX_EXPERTS = 32
MAX_KEYWORDS = 200
MAX_EXAMPLES = 200
MAX_EXAMPLE_CHARS = 2000
MAX_PATTERN_CHARS = 200
MAX_NAME_CHARS = 64
MAX_ADAPTER_CHARS = 256
MAX_DESCRIPTION_CHARS = 2000
MAX_WEIGHT = 100.0

METHODS = ("keyword", "neural", "default")


def _check(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise InvalidExpertTable(path, problem)


def _text(value: Any, path: str, limit: int, *, empty: bool = False) -> str:
    _check(isinstance(value, str), path, f"must be a string, not {type(value).__name__}")
    _check(empty or bool(value.strip()), path, "must not be empty")
    _check(len(value) <= limit, path, f"is {len(value)} characters; the limit is {limit}")
    return value


@dataclass(frozen=True)
class Keyword:
    """A pattern that votes ``weight`` for its expert when it occurs in a prompt.

    Plain patterns match case-insensitively as whole words (``"math"`` does not match
    ``"mathematics"``); ``regex=True`` patterns are Python regular expressions, matched
    case-insensitively as written."""

    pattern: str
    weight: float = 1.0
    regex: bool = False

    def __post_init__(self) -> None:
        _text(self.pattern, "pattern", MAX_PATTERN_CHARS)
        w = self.weight
        _check(isinstance(w, (int, float)) and not isinstance(w, bool), "weight", "must be a number")
        _check(math.isfinite(w) and 0 < w <= MAX_WEIGHT, "weight", f"{w} is not in (0, {MAX_WEIGHT:g}]")
        _check(isinstance(self.regex, bool), "regex", "must be true or false")
        if self.regex:
            try:
                compiled = re.compile(self.pattern, re.IGNORECASE)
            except re.error as exc:
                raise InvalidExpertTable("pattern", f"invalid regex {self.pattern!r}: {exc}") from None
            _check(compiled.search("") is None, "pattern", f"regex {self.pattern!r} matches the empty string")

    @classmethod
    def from_dict(cls, d: Any) -> Keyword:
        if isinstance(d, str):  # shorthand: a bare pattern
            return cls(d)
        _check(isinstance(d, dict), "", "a keyword must be an object or a string")
        unknown = sorted(set(d) - {"pattern", "weight", "regex"})
        _check(not unknown, "", f"unknown field(s) {unknown}")
        _check("pattern" in d, "pattern", "is required")
        return cls(d["pattern"], d.get("weight", 1.0), d.get("regex", False))

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "weight": self.weight, "regex": self.regex}


@dataclass(frozen=True)
class Expert:
    """One routing target: a name, the adapter it serves, and what describes its prompts."""

    name: str
    adapter: str
    description: str = ""
    keywords: tuple[Keyword, ...] = ()
    examples: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _text(self.name, "name", MAX_NAME_CHARS)
        _text(self.adapter, "adapter", MAX_ADAPTER_CHARS)
        _text(self.description, "description", MAX_DESCRIPTION_CHARS, empty=True)
        object.__setattr__(self, "keywords", tuple(self.keywords))
        object.__setattr__(self, "examples", tuple(self.examples))
        n = len(self.keywords)
        _check(n <= MAX_KEYWORDS, "keywords", f"{n} keywords; the limit is {MAX_KEYWORDS}")
        seen: set[tuple[str, bool]] = set()
        for i, kw in enumerate(self.keywords):
            _check(isinstance(kw, Keyword), f"keywords[{i}]", "must be a Keyword")
            key = (kw.pattern.lower(), kw.regex)
            _check(key not in seen, f"keywords[{i}]", f"duplicate keyword {kw.pattern!r}")
            seen.add(key)
        n = len(self.examples)
        _check(n <= MAX_EXAMPLES, "examples", f"{n} examples; the limit is {MAX_EXAMPLES}")
        for i, example in enumerate(self.examples):
            _text(example, f"examples[{i}]", MAX_EXAMPLE_CHARS)

    @classmethod
    def from_dict(cls, d: Any) -> Expert:
        _check(isinstance(d, dict), "", "an expert must be an object")
        allowed = {"name", "adapter", "description", "keywords", "examples"}
        unknown = sorted(set(d) - allowed)
        _check(not unknown, "", f"unknown field(s) {unknown}")
        for required in ("name", "adapter"):
            _check(required in d, required, "is required")
        keywords, examples = d.get("keywords", []), d.get("examples", [])
        _check(isinstance(keywords, list), "keywords", "must be a list")
        _check(isinstance(examples, list), "examples", "must be a list")
        _check(len(keywords) <= MAX_KEYWORDS, "keywords", f"{len(keywords)} keywords; the limit is {MAX_KEYWORDS}")
        parsed = []
        for i, kw in enumerate(keywords):
            try:
                parsed.append(Keyword.from_dict(kw))
            except InvalidExpertTable as exc:
                raise exc.under(f"keywords[{i}]") from None
        return cls(d["name"], d["adapter"], d.get("description", ""), tuple(parsed), tuple(examples))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "adapter": self.adapter, "description": self.description,
                "keywords": [kw.to_dict() for kw in self.keywords], "examples": list(self.examples)}


@dataclass(frozen=True)
class ExpertTable:
    """A tenant's experts and the one to fall back on (``None``: the base model)."""

    experts: tuple[Expert, ...]
    default: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", tuple(self.experts))
        n = len(self.experts)
        _check(n <= MAX_EXPERTS, "experts", f"{n} experts; the limit is {MAX_EXPERTS}")
        names: set[str] = set()
        for i, expert in enumerate(self.experts):
            _check(isinstance(expert, Expert), f"experts[{i}]", "must be an Expert")
            _check(expert.name not in names, f"experts[{i}].name", f"duplicate expert name {expert.name!r}")
            names.add(expert.name)
        if self.default is not None:
            _check(isinstance(self.default, str), "default", "must be a string or null")
            _check(self.default in names, "default", f"{self.default!r} is not the name of an expert")

    @classmethod
    def from_dict(cls, d: Any) -> ExpertTable:
        _check(isinstance(d, dict), "", "an expert table must be an object")
        unknown = sorted(set(d) - {"default", "experts"})
        _check(not unknown, "", f"unknown field(s) {unknown}")
        experts = d.get("experts")
        _check(isinstance(experts, list), "experts", "is required and must be a list")
        _check(len(experts) <= MAX_EXPERTS, "experts", f"{len(experts)} experts; the limit is {MAX_EXPERTS}")
        parsed = []
        for i, e in enumerate(experts):
            try:
                parsed.append(Expert.from_dict(e))
            except InvalidExpertTable as exc:
                raise exc.under(f"experts[{i}]") from None
        return cls(tuple(parsed), d.get("default"))

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default, "experts": [e.to_dict() for e in self.experts]}

    def expert(self, name: str | None) -> Expert | None:
        return next((e for e in self.experts if e.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.experts)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the table (computed once per instance)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Decision:
    """Which expert serves a prompt, how it was chosen and why.

    ``expert``/``adapter`` are ``None`` for the base model; ``method`` is one of
    ``"keyword"``, ``"neural"``, ``"default"``; ``scores`` maps every expert name to the
    score of the method that decided (keyword weights or neural probabilities)."""

    expert: str | None
    adapter: str | None
    method: str
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")


class Classifier(Protocol):
    """What the hybrid router composes: something that maps a prompt to a decision."""

    method: str

    async def classify(self, text: str) -> Decision: ...
