"""The expert router: table validation, keyword rules, the real MiniLM encoder and its
micro-batcher, the centroid head, the hybrid policy and the per-tenant head cache."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import time

import pytest
import torch

from router import (Decision, Encoder, EncoderClosed, Expert, ExpertTable, InvalidExpertTable, Keyword,
                    KeywordClassifier, NeuralClassifier, Router, RouterConfig)
from router.encoder import default_model_dir
from router.neural import CentroidHead, expert_texts
from tests.router.conftest import TABLE

OBVIOUS = {  # no keyword of TABLE occurs in these
    "code": "My JavaScript build fails with a compiler error about a missing semicolon in the parser.",
    "math": "What is the sum of the first one hundred positive integers?",
    "writing": "Compose a heartfelt birthday message in verse for my grandmother.",
    "general": "What is the tallest mountain in Africa and how high is it?",
}


def table_with(**changes) -> dict:
    raw = copy.deepcopy(TABLE)
    raw.update(changes)
    return raw


def expert_dict(name: str = "e", **fields) -> dict:
    return {"name": name, "adapter": "a", **fields}


# table validation ---------------------------------------------------------------------------
class TestExpertTable:
    def test_round_trips_through_dict(self, table):
        again = ExpertTable.from_dict(table.to_dict())
        assert again == table
        assert again.fingerprint == table.fingerprint
        assert table.to_dict()["experts"][1]["keywords"][2] == {"pattern": r"\bdef\b", "weight": 2.0, "regex": True}

    def test_fingerprint_changes_with_content(self, table):
        raw = table.to_dict()
        raw["experts"][0]["examples"].append("One more example.")
        assert ExpertTable.from_dict(raw).fingerprint != table.fingerprint

    @pytest.mark.parametrize(("raw", "path", "words"), [
        ({"experts": [expert_dict("x"), expert_dict("x")]}, "experts[1].name", "duplicate expert name 'x'"),
        ({"experts": [expert_dict("")]}, "experts[0].name", "must not be empty"),
        ({"experts": [expert_dict("  ")]}, "experts[0].name", "must not be empty"),
        ({"experts": [expert_dict("x")], "default": "y"}, "default", "'y' is not the name of an expert"),
        ({"experts": [expert_dict(keywords=[{"pattern": "a(b", "regex": True}])]},
         "experts[0].keywords[0].pattern", "regex 'a(b' is not supported: missing )"),
        ({"experts": [expert_dict(keywords=[{"pattern": "a*", "regex": True}])]},
         "experts[0].keywords[0].pattern", "matches the empty string"),
        ({"experts": [expert_dict(keywords=["x", {"pattern": "y", "weight": 0}])]},
         "experts[0].keywords[1].weight", "is not in (0, 100]"),
        ({"experts": [expert_dict(keywords=[{"pattern": "y", "weight": "2"}])]},
         "experts[0].keywords[0].weight", "must be a number"),
        ({"experts": [expert_dict(keywords=["Python", "python"])]}, "experts[0].keywords[1]", "duplicate keyword"),
        ({"experts": [expert_dict(examples=["ok", ""])]}, "experts[0].examples[1]", "must not be empty"),
        ({"experts": [expert_dict(adapter=None)]}, "experts[0].adapter", "must be a string"),
        ({"experts": [expert_dict(colour="red")]}, "experts[0]", "unknown field(s) ['colour']"),
        ({"experts": [{"adapter": "a"}]}, "experts[0].name", "is required"),
        ({"default": None}, "experts", "is required"),
    ])
    def test_rejects_invalid_tables_naming_the_field(self, raw, path, words):
        with pytest.raises(InvalidExpertTable) as info:
            ExpertTable.from_dict(raw)
        assert isinstance(info.value, ValueError)
        assert info.value.path == path
        assert words in info.value.problem
        assert str(info.value).startswith(f"{path}: ")

    @pytest.mark.parametrize(("raw", "path", "numbers"), [
        ({"experts": [expert_dict(f"e{i}") for i in range(33)]}, "experts", ("33 experts", "limit is 32")),
        ({"experts": [expert_dict(keywords=[f"k{i}" for i in range(201)])]}, "experts[0].keywords",
         ("201 keywords", "limit is 200")),
        ({"experts": [expert_dict(examples=["x"] * 201)]}, "experts[0].examples", ("201 examples", "limit is 200")),
        ({"experts": [expert_dict(examples=["x" * 2001])]}, "experts[0].examples[0]",
         ("2001 characters", "limit is 2000")),
    ])
    def test_limits_state_both_numbers(self, raw, path, numbers):
        with pytest.raises(InvalidExpertTable) as info:
            ExpertTable.from_dict(raw)
        assert info.value.path == path
        assert all(n in info.value.problem for n in numbers)

    def test_at_the_limits_is_valid(self):
        raw = {"experts": [expert_dict(f"e{i}", keywords=[f"k{j}" for j in range(200)], examples=["x" * 2000] * 200)
                           for i in range(32)]}
        assert len(ExpertTable.from_dict(raw).experts) == 32

    def test_direct_construction_validates_too(self):
        with pytest.raises(InvalidExpertTable, match="duplicate expert name"):
            ExpertTable((Expert("a", "x"), Expert("a", "y")))
        with pytest.raises(InvalidExpertTable, match="is not supported"):
            Keyword("(", regex=True)

    def test_decision_rejects_unknown_method(self):
        with pytest.raises(ValueError, match="method 'guess'"):
            Decision(None, None, "guess", 0.0)


# keyword rules ------------------------------------------------------------------------------
def keyword_table(*keywords: Keyword, other: tuple[Keyword, ...] = ()) -> ExpertTable:
    return ExpertTable((Expert("math", "math-lora", keywords=keywords), Expert("other", "o", keywords=other)))


class TestKeywordClassifier:
    def test_plain_patterns_match_whole_words_case_insensitively(self):
        clf = KeywordClassifier(keyword_table(Keyword("math")))
        assert clf.decide("Help with my MATH homework").expert == "math"
        assert clf.decide("math.").expert == "math"
        assert clf.decide("I love mathematics").expert is None
        assert clf.decide("aftermath of the war").expert is None

    def test_phrases_and_symbol_ends(self):
        clf = KeywordClassifier(keyword_table(Keyword("linked list"), Keyword("c++"), Keyword(".py")))
        assert clf.matches("a Linked\n  List in C++ from main.py")[0] == [
            Keyword("linked list"), Keyword("c++"), Keyword(".py")]
        assert clf.matches("linkedlist abc++ mainpy")[0] == []

    def test_regex_patterns_are_case_insensitive_as_written(self):
        clf = KeywordClassifier(keyword_table(Keyword(r"\bpoe(m|try)\b", regex=True), Keyword(r"\d+\s*\+\s*\d+", regex=True)))
        assert [k.pattern for k in clf.matches("A POEM: 2 + 2")[0]] == [r"\bpoe(m|try)\b", r"\d+\s*\+\s*\d+"]
        assert clf.matches("poems and poets")[0] == []

    def test_weights_add_up_and_count_once_per_pattern(self):
        clf = KeywordClassifier(keyword_table(Keyword("integral", 3.0), Keyword("sum", 0.5),
                                              other=(Keyword("python", 2.0),)), evidence=1.0)
        decision = clf.decide("integral integral sum in python")
        assert decision.scores == {"math": 3.5, "other": 2.0}
        assert decision.expert == "math" and decision.adapter == "math-lora"
        assert decision.confidence == pytest.approx((3.5 - 2.0) / (3.5 + 1.0))

    def test_confidence_grows_with_evidence_and_a_tie_has_none(self):
        clf = KeywordClassifier(keyword_table(Keyword("a"), Keyword("b"), other=(Keyword("c"),)), evidence=1.0)
        assert clf.decide("a").confidence == pytest.approx(0.5)
        assert clf.decide("a b").confidence == pytest.approx(2 / 3)
        assert clf.decide("a c").confidence == 0.0

    def test_reason_lists_the_matched_patterns(self):
        clf = KeywordClassifier(keyword_table(Keyword("integral", 3.0), Keyword("limit"), other=(Keyword("python", 2.0),)))
        reason = clf.decide("the integral of a python function").reason
        assert "math: 'integral' (3)" in reason and "other: 'python' (2)" in reason
        assert "limit" not in reason

    def test_no_match_decides_nothing(self):
        decision = KeywordClassifier(keyword_table(Keyword("math"))).decide("hello there")
        assert (decision.expert, decision.adapter, decision.confidence) == (None, None, 0.0)
        assert decision.scores == {"math": 0.0, "other": 0.0}
        assert decision.reason == "no keyword matched"

    def test_scans_only_the_first_max_chars(self):
        clf = KeywordClassifier(keyword_table(Keyword("math")), max_chars=100)
        assert clf.decide("x " * 100 + "math").expert is None
        assert clf.decide("math " + "x " * 100).expert == "math"


# the encoder --------------------------------------------------------------------------------
class TestEncoder:
    def test_features_are_unit_norm(self, encoder):
        vectors = encoder.encode(["hello world", "a much longer sentence about routing prompts to experts"])
        assert vectors.shape == (2, encoder.dimension) == (2, 768)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(2), atol=1e-5)

    def test_layer_six_is_the_model_cards_sentence_embedding(self):
        from transformers import AutoModel

        texts = ["hello world", "Write a Python function that reverses a list, please.", "what is 2+2"]
        ours = Encoder(layers=(6,), fp16_weights=False)
        hf = AutoModel.from_pretrained(default_model_dir(), local_files_only=True).eval()
        encoded = ours._tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        with torch.inference_mode():
            hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        reference = torch.nn.functional.normalize(pooled, dim=-1)
        assert torch.allclose(ours.encode(texts), reference, atol=1e-5)
        packed = Encoder(layers=(6,))
        assert torch.allclose(packed.encode(texts), reference, atol=2e-3)

    def test_rejects_layers_outside_the_model(self):
        with pytest.raises(ValueError, match="layers"):
            Encoder(layers=(7,))

    async def test_concurrent_embeds_share_batches_and_match_single_encoding(self, encoder):
        texts = [f"prompt number {i} about {'code' if i % 2 else 'poetry'} and more words" * (1 + i % 3)
                 for i in range(20)]
        before = encoder.batches
        vectors = await asyncio.gather(*(encoder.embed(t) for t in texts))
        batches = encoder.batches - before
        assert 1 <= batches < len(texts)
        singles = torch.cat([encoder.encode([t]) for t in texts])
        assert torch.allclose(torch.stack(vectors), singles, atol=1e-5)

    async def test_batches_are_capped_at_max_batch(self):
        small = Encoder(max_batch=4)
        try:
            await asyncio.gather(*(small.embed(f"text {i}") for i in range(10)))
            assert small.batches == 3
            assert small.texts == 10
        finally:
            await small.aclose()

    async def test_event_loop_keeps_ticking_while_encoding(self, encoder):
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        texts = [f"{i}: " + "a long prompt that keeps the encoder busy for a while " * 8 for i in range(64)]
        task = asyncio.create_task(ticker())
        started = time.perf_counter()
        await asyncio.gather(*(encoder.embed(t) for t in texts))
        elapsed = time.perf_counter() - started
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert elapsed > 0.05  # long enough that a blocked loop would show
        assert ticks >= 10

    async def test_closed_encoder_refuses_and_fails_queued_callers(self):
        enc = Encoder(window_s=10.0)  # the batch waits: its callers are still queued at aclose
        queued = asyncio.ensure_future(enc.embed("waiting"))
        await asyncio.sleep(0.01)
        await enc.aclose()
        with pytest.raises(EncoderClosed):
            await queued
        with pytest.raises(EncoderClosed):
            await enc.embed("after")


# the neural classifier ----------------------------------------------------------------------
class TestNeuralClassifier:
    async def test_separates_obviously_different_prompts(self, encoder, table):
        clf = NeuralClassifier(encoder, table, temperature=0.02)
        for expected, prompt in OBVIOUS.items():
            decision = await clf.classify(prompt)
            assert decision.expert == expected, decision.reason
            assert decision.method == "neural"
            assert sum(decision.scores.values()) == pytest.approx(1.0, abs=1e-5)

    async def test_fits_once_for_concurrent_callers(self, encoder, table):
        clf = NeuralClassifier(encoder, table)
        before = encoder.texts
        heads = await asyncio.gather(*(clf.head() for _ in range(5)))
        assert all(h is heads[0] for h in heads)
        assert encoder.texts - before == sum(len(expert_texts(e)) for e in table.experts)

    def test_centroids_and_temperature(self, table):
        centroids = torch.eye(4, 8)
        head = CentroidHead(table, centroids, temperature=0.5)
        probs = head.probabilities(torch.eye(8)[2])
        assert int(probs.argmax()) == 2 and float(probs.sum()) == pytest.approx(1.0)
        sharper = CentroidHead(table, centroids, temperature=0.05).probabilities(torch.eye(8)[2])
        assert float(sharper[2]) > float(probs[2])
        with pytest.raises(ValueError, match="temperature"):
            CentroidHead(table, centroids, temperature=0)
        with pytest.raises(ValueError, match="do not fit 4 experts"):
            CentroidHead(table, torch.eye(3, 8), temperature=0.5)

    def test_expert_texts(self, table):
        code = table.expert("code")
        texts = expert_texts(code)
        assert texts[:4] == list(code.examples) and texts[4] == code.description
        assert texts[5] == "python, sql"  # regex keywords are no words
        assert expert_texts(code, include_keywords=False)[-1] == code.description
        assert expert_texts(Expert("bare", "a")) == ["bare"]


# one contract for every classifier --------------------------------------------------------
class ClassifierContract:
    @pytest.fixture()
    def classifier(self, encoder, table):
        raise NotImplementedError

    async def test_decision_shape(self, classifier, table):
        decision = await classifier.classify("Please rewrite this poem about python and integrals.")
        assert isinstance(decision, Decision)
        assert decision.method == classifier.method
        assert set(decision.scores) == set(table.names)
        assert 0.0 <= decision.confidence <= 1.0
        assert decision.expert in table.names
        assert decision.adapter == table.expert(decision.expert).adapter
        assert decision.reason

    async def test_decides_the_obvious(self, classifier):
        decision = await classifier.classify("Compute the integral of x^2, then solve the equation.")
        assert decision.expert == "math"


class TestKeywordContract(ClassifierContract):
    @pytest.fixture()
    def classifier(self, encoder, table):
        return KeywordClassifier(table)


class TestNeuralContract(ClassifierContract):
    @pytest.fixture()
    def classifier(self, encoder, table):
        return NeuralClassifier(encoder, table)


# the hybrid router --------------------------------------------------------------------------
@pytest.fixture()
async def router(encoder):
    r = Router(encoder, close_encoder=False)
    yield r
    await r.close()


class TestRouter:
    async def test_keyword_wins_when_confident_without_encoding(self, router, encoder, table):
        before = encoder.texts
        decision = await router.route("t1", table, "Write a python script that reads a CSV")
        assert (decision.method, decision.expert, decision.adapter) == ("keyword", "code", "code-lora")
        assert "'python'" in decision.reason
        assert encoder.texts == before  # neither fitted nor encoded

    async def test_neural_decides_when_keywords_are_not_confident(self, router, table):
        for expected, prompt in OBVIOUS.items():
            decision = await router.route("t1", table, prompt)
            assert (decision.method, decision.expert) == ("neural", expected), decision.reason

    async def test_weak_keyword_evidence_goes_to_the_neural_stage(self, router, table):
        # 'math' (weight 1) alone: confidence 1 / (1 + 2) < 0.4
        decision = await router.route("t1", table, "Can you help me get ready for math class tomorrow?")
        assert decision.method == "neural"

    async def test_default_expert_below_the_neural_threshold(self, encoder, table):
        router = Router(encoder, RouterConfig(neural_threshold=0.99, temperature=1.0), close_encoder=False)
        decision = await router.route("t1", table, OBVIOUS["code"])
        assert (decision.method, decision.expert, decision.adapter) == ("default", "general", "general-lora")
        assert "< 0.99" in decision.reason and decision.confidence < 0.99
        assert set(decision.scores) == set(table.names)

    async def test_base_model_when_no_default(self, encoder, table):
        router = Router(encoder, RouterConfig(neural_threshold=0.99, temperature=1.0), close_encoder=False)
        no_default = ExpertTable(table.experts, default=None)
        decision = await router.route("t1", no_default, OBVIOUS["code"])
        assert (decision.method, decision.expert, decision.adapter) == ("default", None, None)
        assert "base model" in decision.reason

    async def test_empty_table_routes_to_the_base_model(self, router):
        decision = await router.route("t1", ExpertTable(()), "anything at all")
        assert (decision.expert, decision.adapter, decision.method) == (None, None, "default")

    async def test_blend_mixes_keyword_votes_into_the_neural_stage(self, encoder, table):
        router = Router(encoder, RouterConfig(keyword_threshold=1.01, blend=0.9), close_encoder=False)
        decision = await router.route("t1", table, "Tell me about the history of " + OBVIOUS["math"])
        assert decision.method == "neural" and decision.expert == "general"  # 'history' votes general
        assert "blended 0.9" in decision.reason

    async def test_head_cache_refits_only_when_the_table_changes(self, router, encoder, table):
        await router.route("t1", table, OBVIOUS["code"])
        assert router.fits == 1
        fitted = encoder.texts
        await router.route("t1", ExpertTable.from_dict(table.to_dict()), OBVIOUS["math"])  # same content
        assert router.fits == 1
        assert encoder.texts == fitted + 1  # only the prompt was encoded

        raw = table.to_dict()
        raw["experts"][2]["keywords"].append({"pattern": "sum", "weight": 5.0})
        changed = ExpertTable.from_dict(raw)
        decision = await router.route("t1", changed, OBVIOUS["math"])
        assert router.fits == 2
        assert decision.method == "keyword" and "'sum' (5)" in decision.reason
        await router.route("t1", changed, OBVIOUS["code"])  # neural stage: a fresh head
        assert encoder.texts == fitted + 1 + sum(len(expert_texts(e)) for e in changed.experts) + 1

    def test_tenants_have_their_own_heads_in_a_bounded_lru(self, encoder, table):
        router = Router(encoder, RouterConfig(cache_size=2), close_encoder=False)
        for tenant in ("a", "b", "a", "c"):  # c evicts b, the least recently used
            router.classifiers(tenant, table)
        assert router.fits == 3
        router.classifiers("a", table)
        assert router.fits == 3
        router.classifiers("b", table)
        assert router.fits == 4

    async def test_close_closes_an_owned_encoder_only(self, encoder, table):
        await Router(encoder, close_encoder=False).close()
        assert (await encoder.embed("still open")).shape == (encoder.dimension,)
        owned = Encoder()
        await Router(owned).close()
        with pytest.raises(EncoderClosed):
            await owned.embed("closed")

    def test_config_validates(self):
        with pytest.raises(ValueError, match="blend"):
            RouterConfig(blend=1.5)
        with pytest.raises(ValueError, match="cache_size"):
            RouterConfig(cache_size=0)
