"""Value types of the router: a tenant's expert table and a routing decision.

An :class:`ExpertTable` is what a tenant uploads (JSON)::

    {"default": "general",
     "experts": [{"name": "code", "adapter": "code-lora", "description": "...",
                  "keywords": [{"pattern": "python", "weight": 1.0, "regex": false}],
                  "examples": ["Write a function that ..."]}]}

Every type validates itself on construction and raises :class:`InvalidExpertTable` (a
``ValueError``) naming the offending field. Limits bound the work a table can cause per
request: at most 32 experts, 200 keywords and 200 examples per expert, 2,000 characters per
example. Keyword patterns are tenant input, so they are matched by RE2 (``google-re2``), in time
linear in the prompt whatever the pattern: RE2 has no backreferences or lookaround, and a regex
keyword RE2 cannot compile, or that compiles to more than ``MAX_PATTERN_PROGRAM`` instructions,
is rejected, and so is a table whose regexes pass ``MAX_TABLE_PROGRAM`` instructions together. A stored table is read back with :meth:`ExpertTable.from_stored`, which leaves out
(and reports) the keywords an older version accepted and this one does not.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Protocol

import re2

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
#: RE2 instructions a regex keyword may compile to. Bounds its compile time (~0.3 µs per
#: instruction) and its scan, which is linear but costs ~1.6 ns per instruction per prompt byte
#: when RE2's DFA gives way to its NFA; Unicode classes (``\pL``) are ~1,200 instructions each
MAX_PATTERN_PROGRAM = 4000
#: RE2 instructions all regex keywords of one table may compile to together: what bounds the
#: work one tenant's table costs per request (a table at the limit scans an 8,000-character
#: prompt in tens of milliseconds at worst, off the event loop) and per compile
MAX_TABLE_PROGRAM = 10_000
#: memory RE2 may use per pattern, for its program and its DFA caches together
PATTERN_MAX_MEM = 1 << 20

METHODS = ("keyword", "neural", "default")


def _check(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise InvalidExpertTable(path, problem)


def _text(value: Any, path: str, limit: int, *, empty: bool = False) -> str:
    _check(isinstance(value, str), path, f"must be a string, not {type(value).__name__}")
    _check(empty or bool(value.strip()), path, "must not be empty")
    _check(len(value) <= limit, path, f"is {len(value)} characters; the limit is {limit}")
    return value


def _pattern_options() -> re2.Options:
    options = re2.Options()
    options.case_sensitive = False
    options.never_capture = True  # only presence is tested: no submatches to track
    options.log_errors = False  # RE2 would print every rejected pattern to stderr
    options.max_mem = PATTERN_MAX_MEM
    return options


_PATTERN_OPTIONS = _pattern_options()


def compile_pattern(source: str) -> re2._Regexp:
    """``source`` compiled by RE2, case-insensitive, in bounded memory (match it against UTF-8
    bytes). Raises ``ValueError`` saying why RE2 cannot, or will not, run it."""
    try:
        compiled = re2.compile(source, options=_PATTERN_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid pattern"
        raise ValueError(reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)) from None
    except UnicodeEncodeError:
        raise ValueError("it holds a lone surrogate, which is not text") from None
    return compiled


def _quoted(pattern: str) -> str:
    """``pattern`` for a message: quoted, and cut at 64 characters."""
    return repr(pattern if len(pattern) <= 64 else pattern[:64] + "…")


def _number(value: int | float) -> str:
    """``value`` for a message; an integer beyond a float's range (JSON can carry ``10**400``)
    is described by its size rather than spelled out."""
    if isinstance(value, int) and abs(value) > 10**15:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return str(value)


def _check_weight(weight: Any) -> None:
    """A number in (0, ``MAX_WEIGHT``]. Compared as it is, never converted to a float: an integer
    too large for one would raise ``OverflowError``; NaN fails every comparison."""
    _check(isinstance(weight, (int, float)) and not isinstance(weight, bool), "weight", "must be a number")
    _check(0 < weight <= MAX_WEIGHT, "weight", f"{_number(weight)} is not in (0, {MAX_WEIGHT:g}]")


def _check_regex(pattern: str) -> int:
    """A regex keyword RE2 compiles, within the size limit, and that never matches empty text;
    returns its program size."""
    shown = _quoted(pattern)
    try:
        compiled = compile_pattern(pattern)
    except ValueError as exc:
        raise InvalidExpertTable("pattern", f"regex {shown} is not supported: {exc}; patterns are matched "
                                            "with RE2 (no backreferences or lookaround)") from None
    size = compiled.programsize
    _check(size <= MAX_PATTERN_PROGRAM, "pattern",
           f"regex {shown} is too large: it compiles to {size} RE2 instructions; the limit is {MAX_PATTERN_PROGRAM}")
    _check(compiled.search(b"") is None, "pattern", f"regex {shown} matches the empty string")
    return size


def _check_plain(pattern: str) -> None:
    """A plain keyword is escaped before RE2 sees it; only text UTF-8 cannot encode would fail."""
    try:
        pattern.encode()
    except UnicodeEncodeError:
        raise InvalidExpertTable("pattern", f"{_quoted(pattern)} holds a lone surrogate, which is not text") from None


@dataclass(frozen=True)
class Keyword:
    """A pattern that votes ``weight`` for its expert when it occurs in a prompt.

    Plain patterns match case-insensitively as whole words (``"math"`` does not match
    ``"mathematics"``); ``regex=True`` patterns are RE2 regular expressions (Python's syntax
    without backreferences or lookaround; ``\\w``, ``\\d`` and ``\\b`` are ASCII-only, ``\\pL``
    and ``\\pN`` are any script's letters and digits), matched case-insensitively as written."""

    pattern: str
    weight: float = 1.0
    regex: bool = False
    #: RE2 instructions the regex compiles to (0 for plain patterns); counted against the table
    program_size: int = field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        _text(self.pattern, "pattern", MAX_PATTERN_CHARS)
        _check_weight(self.weight)
        _check(isinstance(self.regex, bool), "regex", "must be true or false")
        if self.regex:
            object.__setattr__(self, "program_size", _check_regex(self.pattern))
        else:
            _check_plain(self.pattern)

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
class SkippedKeyword:
    """A stored keyword that :meth:`ExpertTable.from_stored` left out of the table, and why."""

    expert: str
    pattern: str
    reason: str

    @classmethod
    def of(cls, expert: str, raw: Any, error: InvalidExpertTable) -> SkippedKeyword:
        pattern = raw.get("pattern") if isinstance(raw, dict) else raw
        pattern = pattern if isinstance(pattern, str) else ""
        # a lone surrogate would break the JSON that reports it
        return cls(expert, pattern.encode(errors="backslashreplace").decode(), str(error))

    def to_dict(self) -> dict[str, Any]:
        return {"expert": self.expert, "pattern": self.pattern, "reason": self.reason}


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
    def from_dict(cls, d: Any, *, skipped: list[SkippedKeyword] | None = None) -> Expert:
        """The expert ``d`` describes. With a ``skipped`` list, a keyword that does not validate
        is appended to it and left out instead of failing the expert."""
        _check(isinstance(d, dict), "", "an expert must be an object")
        allowed = {"name", "adapter", "description", "keywords", "examples"}
        unknown = sorted(set(d) - allowed)
        _check(not unknown, "", f"unknown field(s) {unknown}")
        for required in ("name", "adapter"):
            _check(required in d, required, "is required")
        name = _text(d["name"], "name", MAX_NAME_CHARS)
        keywords, examples = d.get("keywords", []), d.get("examples", [])
        _check(isinstance(keywords, list), "keywords", "must be a list")
        _check(isinstance(examples, list), "examples", "must be a list")
        _check(len(keywords) <= MAX_KEYWORDS, "keywords", f"{len(keywords)} keywords; the limit is {MAX_KEYWORDS}")
        parsed = []
        for i, kw in enumerate(keywords):
            try:
                parsed.append(Keyword.from_dict(kw))
            except InvalidExpertTable as exc:
                if skipped is None:
                    raise exc.under(f"keywords[{i}]") from None
                skipped.append(SkippedKeyword.of(name, kw, exc))
        return cls(name, d["adapter"], d.get("description", ""), tuple(parsed), tuple(examples))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "adapter": self.adapter, "description": self.description,
                "keywords": [kw.to_dict() for kw in self.keywords], "examples": list(self.examples)}


def _within_budget(experts: list[Expert], skipped: list[SkippedKeyword]) -> list[Expert]:
    """``experts`` with the regex keywords, in table order, that would take the table past
    MAX_TABLE_PROGRAM left out (and appended to ``skipped``)."""
    used, out = 0, []
    for expert in experts:
        kept = []
        for kw in expert.keywords:
            if used + kw.program_size > MAX_TABLE_PROGRAM:
                skipped.append(SkippedKeyword(expert.name, kw.pattern, f"the table's regex keywords pass the limit "
                                              f"of {MAX_TABLE_PROGRAM} RE2 instructions in all"))
                continue
            used += kw.program_size
            kept.append(kw)
        out.append(expert if len(kept) == len(expert.keywords) else replace(expert, keywords=tuple(kept)))
    return out


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
        total = sum(kw.program_size for expert in self.experts for kw in expert.keywords)
        _check(total <= MAX_TABLE_PROGRAM, "experts", f"the regex keywords compile to {total} RE2 instructions "
               f"in all; the limit per table is {MAX_TABLE_PROGRAM} (fewer or simpler regexes, or plain keywords)")

    @classmethod
    def from_dict(cls, d: Any, *, skipped: list[SkippedKeyword] | None = None) -> ExpertTable:
        """The table ``d`` describes; ``skipped`` as in :meth:`Expert.from_dict`."""
        _check(isinstance(d, dict), "", "an expert table must be an object")
        unknown = sorted(set(d) - {"default", "experts"})
        _check(not unknown, "", f"unknown field(s) {unknown}")
        experts = d.get("experts")
        _check(isinstance(experts, list), "experts", "is required and must be a list")
        _check(len(experts) <= MAX_EXPERTS, "experts", f"{len(experts)} experts; the limit is {MAX_EXPERTS}")
        parsed = []
        for i, e in enumerate(experts):
            try:
                parsed.append(Expert.from_dict(e, skipped=skipped))
            except InvalidExpertTable as exc:
                raise exc.under(f"experts[{i}]") from None
        if skipped is not None:
            parsed = _within_budget(parsed, skipped)
        return cls(tuple(parsed), d.get("default"))

    @classmethod
    def from_stored(cls, d: Any) -> tuple[ExpertTable, list[SkippedKeyword]]:
        """A table read back from the store, and the keywords left out of it.

        The store holds what the version that wrote it validated, and validation changes
        between versions (a regex with a backreference, which RE2 cannot compile, say). Failing
        the whole table would fail every ``auto`` request of the tenant, so a keyword that does
        not validate is left out and reported; anything else wrong still raises
        :class:`InvalidExpertTable`."""
        skipped: list[SkippedKeyword] = []
        return cls.from_dict(d, skipped=skipped), skipped

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
