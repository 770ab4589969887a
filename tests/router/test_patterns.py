"""Keyword patterns are tenant input: RE2 matches them (linear time, whatever the pattern), plain
patterns keep Python's Unicode word semantics, validation rejects what RE2 cannot run, and a
stored table is read back leniently."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from router import Expert, ExpertTable, InvalidExpertTable, Keyword, KeywordClassifier, SkippedKeyword
from router.keywords import compile_keyword
from router.types import MAX_PATTERN_CHARS, MAX_PATTERN_PROGRAM, MAX_TABLE_PROGRAM


def one_expert(*keywords: Keyword) -> ExpertTable:
    return ExpertTable((Expert("e", "e-lora", keywords=keywords),))


def occurs(pattern: str, text: str, *, regex: bool = False) -> bool:
    keyword = Keyword(pattern, regex=regex)
    return KeywordClassifier(one_expert(keyword), max_chars=10_000).matches(text)[0] == [keyword]


def raw_keyword_table(*keywords) -> dict:
    return {"default": None, "experts": [{"name": "e", "adapter": "e-lora", "keywords": list(keywords)}]}


# RE2 does the matching -------------------------------------------------------------------------
def test_compiled_patterns_are_re2s():
    keywords = (Keyword("math"), Keyword("linked list"), Keyword(r"\bdef\b", regex=True))
    assert {type(compile_keyword(kw)).__module__ for kw in keywords} == {"re2"}
    clf = KeywordClassifier(one_expert(*keywords))
    assert {type(rule.compiled).__module__ for rule in clf._plain + clf._regex} == {"re2"}


@pytest.mark.parametrize(("pattern", "expected"), [
    ("(a+)+$", False), ("(a|aa)+$", False), ("(.*a){20}", True), ("(a+)+b", True), ("(a|a?)+c", False),
])
def test_pathological_regexes_are_accepted_and_answer_right(pattern, expected):
    assert type(compile_keyword(Keyword(pattern, regex=True))).__module__ == "re2"  # before any long scan
    assert occurs(pattern, "a" * 8000 + "b", regex=True) is expected


# plain patterns: Unicode whole words, as with Python's \w -------------------------------------------
@pytest.mark.parametrize(("pattern", "text", "expected"), [
    ("café", "cafés", False),
    ("café", "café au lait", True),
    ("café", "un CAFÉ, s'il vous plaît", True),
    ("café", "décaféiné", False),
    ("École", "l'école", True),
    ("naïve", "a NAÏVE approach", True),
    ("中文", "我学 中文。", True),
    ("中文", "学中文", False),  # a CJK character is a word character, as in Python's re
    ("東京", "東京タワー", False),
    ("math", "math_homework", False),  # "_" is a word character
    ("math", "math١", False),  # so is a digit of any script
    ("math", "Math homework", True),
    ("PYTHON", "python", True),
    ("c++", "c++ code", True),
    ("c++", "abc++", False),
    (".py", "main.py", True),
    (".py", "mainpy", False),
    ("linked list", "linked  list", True),
    ("linked list", "Linked\n\tList", True),
    ("linked list", "linked\u00a0list", True),  # any whitespace, as str.split() sees it
    ("linked list", "linkedlist", False),
])
def test_plain_patterns_match_unicode_whole_words(pattern, text, expected):
    assert occurs(pattern, text) is expected


def python_oracle(pattern: str) -> re.Pattern[str]:
    """Plain-pattern semantics in Python's re, on lower-cased text: the behaviour RE2 must keep."""
    text = pattern.strip().lower()
    body = r"\s+".join(re.escape(part) for part in text.split())
    head = r"(?<!\w)" if re.match(r"\w", text[0]) else ""
    tail = r"(?!\w)" if re.match(r"\w", text[-1]) else ""
    return re.compile(head + body + tail)


TRICKY = st.text(alphabet="aAbéÉ中文_1٣+.- \t\n\u00a0\u2003\u0301İßK", max_size=12)


@settings(max_examples=300, deadline=None)
@given(pattern=TRICKY.filter(str.strip), text=TRICKY)
def test_plain_patterns_agree_with_pythons_word_semantics(pattern, text):
    assert occurs(pattern, text) is (python_oracle(pattern).search(text.lower()) is not None)


def test_a_plain_pattern_counts_once_and_its_needle_gates_it():
    clf = KeywordClassifier(one_expert(Keyword("linked list", 2.0)))
    assert clf.decide("linked list, linked  list, LINKED LIST").scores == {"e": 2.0}
    assert clf.matches("a list that is linked")[0] == []


@pytest.mark.parametrize("pattern", ["a " * 100, "+" * MAX_PATTERN_CHARS, "中" * MAX_PATTERN_CHARS])
def test_the_largest_plain_patterns_compile(pattern):
    keyword = Keyword(pattern.strip())
    assert occurs(keyword.pattern, f"x {keyword.pattern} y")


# validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?<=x)y", r"(?<!x)y", r"(?=a)", r"x(?!y)", r"(?P<w>a)(?P=w)",
                                     r"(?>ab)c", r"end\Z"])
def test_regexes_re2_cannot_run_are_rejected_naming_the_pattern(pattern):
    with pytest.raises(InvalidExpertTable) as info:
        ExpertTable.from_dict(raw_keyword_table("fine", {"pattern": pattern, "regex": True}))
    assert info.value.path == "experts[0].keywords[1].pattern"
    assert f"regex {pattern!r} is not supported" in info.value.problem
    assert "RE2 (no backreferences or lookaround)" in info.value.problem


def test_a_regex_too_large_for_re2_is_rejected():
    with pytest.raises(InvalidExpertTable, match=rf"too large: it compiles to \d+ RE2 instructions; "
                                                 rf"the limit is {MAX_PATTERN_PROGRAM}"):
        Keyword(r"\pL{20}", regex=True)
    assert Keyword(r"[^\pL\pN_]\pL+", regex=True)  # Unicode classes themselves are fine


def test_still_rejects_regexes_that_match_empty_text():
    for pattern in ("a*", "^", r"(?:x|)"):
        with pytest.raises(InvalidExpertTable, match="matches the empty string"):
            Keyword(pattern, regex=True)


def test_long_patterns_are_cut_in_messages():
    pattern = r"(a)\1" + "x" * 150
    with pytest.raises(InvalidExpertTable) as info:
        Keyword(pattern, regex=True)
    assert repr(pattern[:64] + "…") in info.value.problem and pattern not in info.value.problem


def test_a_lone_surrogate_is_no_pattern():
    for regex in (False, True):
        with pytest.raises(InvalidExpertTable, match="lone surrogate"):
            Keyword("x\ud800", regex=regex)


@pytest.mark.parametrize("weight", [pytest.param(10**400, id="10**400"), pytest.param(-10**400, id="-10**400"),
                                    float("nan"), float("inf"), 0, 100.5])
def test_weights_out_of_range_are_invalid_tables_even_beyond_a_float(weight):
    with pytest.raises(InvalidExpertTable) as info:
        ExpertTable.from_dict(raw_keyword_table({"pattern": "x", "weight": weight}))
    assert info.value.path == "experts[0].keywords[0].weight"
    assert "is not in (0, 100]" in info.value.problem


def test_a_huge_weight_is_described_not_spelled_out():
    with pytest.raises(InvalidExpertTable, match=r"an integer of about 401 digits is not in"):
        Keyword("x", 10**400)
    assert Keyword("x", 100).weight == 100


# reading a stored table back ------------------------------------------------------------------------
def test_from_stored_leaves_out_and_reports_keywords_that_no_longer_compile():
    raw = raw_keyword_table("python", {"pattern": r"(a)\1", "regex": True, "weight": 2.0},
                            {"pattern": r"\bdef\b", "regex": True})
    with pytest.raises(InvalidExpertTable):
        ExpertTable.from_dict(raw)  # what PUT /v1/experts sees: strict
    table, skipped = ExpertTable.from_stored(raw)
    assert [kw.pattern for kw in table.experts[0].keywords] == ["python", r"\bdef\b"]
    assert skipped == [SkippedKeyword("e", r"(a)\1", skipped[0].reason)]
    assert skipped[0].reason.startswith("pattern: regex '(a)\\\\1' is not supported")
    assert skipped[0].to_dict() == {"expert": "e", "pattern": r"(a)\1", "reason": skipped[0].reason}
    assert KeywordClassifier(table).decide("def f(): python").expert == "e"


def test_from_stored_reports_a_surrogate_pattern_as_text():
    table, skipped = ExpertTable.from_stored(raw_keyword_table("ok", "x\ud800"))
    assert [kw.pattern for kw in table.experts[0].keywords] == ["ok"]
    assert skipped[0].pattern == "x\\ud800"
    skipped[0].pattern.encode()  # reportable as JSON


def test_from_stored_still_fails_a_table_broken_beyond_keywords():
    with pytest.raises(InvalidExpertTable, match="experts"):
        ExpertTable.from_stored({"experts": "nope"})
    with pytest.raises(InvalidExpertTable, match="default"):
        ExpertTable.from_stored({**raw_keyword_table("x"), "default": "missing"})


def _costly_table(regexes: int) -> dict:
    """A table whose regex keywords together pass the per-table budget (each is well within the
    per-pattern limit)."""
    pattern = "(x|y)" + "[a-f]{1,40}"
    size = Keyword(pattern, regex=True).program_size
    assert 0 < size <= MAX_PATTERN_PROGRAM
    per_expert = MAX_TABLE_PROGRAM // size // 4 + 1
    experts = [{"name": f"e{i}", "adapter": "a",
                "keywords": [{"pattern": f"{pattern}{i}_{j}", "regex": True} for j in range(per_expert)]}
               for i in range(regexes)]
    return {"experts": experts}


def test_a_table_whose_regexes_pass_the_budget_together_is_rejected():
    with pytest.raises(InvalidExpertTable) as caught:
        ExpertTable.from_dict(_costly_table(4))
    assert f"the limit per table is {MAX_TABLE_PROGRAM}" in str(caught.value)
    assert ExpertTable.from_dict(_costly_table(3)).experts  # just under it is fine


def test_from_stored_keeps_regexes_up_to_the_budget_and_reports_the_rest():
    table, skipped = ExpertTable.from_stored(_costly_table(4))
    total = sum(kw.program_size for e in table.experts for kw in e.keywords)
    assert 0 < total <= MAX_TABLE_PROGRAM
    assert skipped and all("RE2 instructions in all" in s.reason for s in skipped)
    assert {s.expert for s in skipped} == {"e3"}  # kept in table order, the last ones left out
