"""The Self-RAG SmolLM2's training data (selfrag/training/smollm2_data.py): every example in
the reflection layout, answers that the passage holds, relevance that says whether it
answers, the held-out split disjoint from training, and the committed data files whole.
Expected facts are recomputed here from the examples' own text, never from the maker."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from selfrag import tokens as T
from selfrag.training import names
from selfrag.training.relations import HELDOUT_QUESTIONS, RELATIONS, parse_question, stated_answer, statements
from selfrag.training.smollm2_data import KIND_WEIGHTS, heldout_record, make_examples, realfacts

N = 1500
TEXT = "(?:(?!" + "|".join(map(re.escape, T.ADDED_TOKENS)) + ").)+"     # free text: no added token
LAYOUT = re.compile(
    rf"^(?:\[No Retrieval\](?P<nr>{TEXT})"
    rf"|(?:\[Retrieval\]<paragraph>(?P<title>[^\n]*)\n(?P<text>{TEXT})</paragraph>"
    rf"\[(?P<rel>Relevant|Irrelevant)\](?P<ans>{TEXT})"
    r"\[(?P<sup>Fully supported|Partially supported|No support / Contradictory)\]"
    rf"(?:\[Continue to Use Evidence\]{TEXT}\[(?:Fully supported|Partially supported)\])*)+)"
    r"\[Utility:[1-5]\]$", re.DOTALL)


@pytest.fixture(scope="module")
def train():
    return make_examples(N, seed=0, split="train")


@pytest.fixture(scope="module")
def heldout():
    return make_examples(600, seed=0, split="heldout")


def passages(output: str) -> list[str]:
    return re.findall(r"<paragraph>([^<]*)</paragraph>", output)


def test_every_example_has_the_reflection_layout(train, heldout):
    for ex in train + heldout:
        assert LAYOUT.match(ex["output"]), ex
        assert "</s>" not in ex["output"] and "<|im_end|>" not in ex["output"]    # the encoder adds EOS
        assert ex["instruction"].strip() == ex["instruction"] and ex["instruction"]


def test_every_kind_is_drawn_and_deterministic(train):
    assert set(Counter(ex["kind"] for ex in train)) == set(KIND_WEIGHTS)
    assert make_examples(50, seed=0) == train[:50]
    assert make_examples(50, seed=1) != train[:50]


def test_real_gold_answers_come_from_their_passage(train):
    n = 0
    for ex in train:
        if ex["kind"] != "real_gold":
            continue
        m = LAYOUT.match(ex["output"])
        assert m["rel"] == "Relevant" and m["sup"] == "Fully supported"
        assert m["ans"].rstrip(".") in m["text"], ex           # a sentence of it, or its short answer
        n += 1
    assert n > 100


def test_irrelevant_passages_do_not_name_the_subject(train):
    """An [Irrelevant] made-up-entity example's passage is about another entity: its title
    is not the subject the question names."""
    seen = 0
    for ex in train:
        if ex["kind"] != "irrelevant":
            continue
        m = LAYOUT.match(ex["output"])
        assert m["rel"] == "Irrelevant" and m["sup"] == "No support / Contradictory"
        assert m["title"] not in ex["instruction"], ex
        seen += 1
    assert seen > 50


def test_reading_back_by_hand():
    """The parser the checks below use, on sentences written here."""
    text = ("Velmora is a country. The capital of Velmora is Quinbeltor. Born in Oslo, Ngoga Waéi grew up "
            "there. The capital of Dorn is Ash. G. H. Hardy was a mathematician.")
    assert statements(text, "capital") == {("velmora", "Quinbeltor"), ("dorn", "Ash")}
    assert statements(text, "birthplace") == {("ngoga waéi", "Oslo")}
    assert ("capital", "velmora") in parse_question("Which city is the capital of Velmora?")
    assert {r for r, _ in parse_question("Who created the Ulm loom?")} == {"inventor", "founder"}
    assert stated_answer("What is the capital of Dorn?", text) == ["Ash"]
    assert stated_answer("What is the capital of Kenya?", text) == []


def test_missing_passages_lack_the_asked_fact(train):
    """The entity's own passage without the asked relation: judged [Irrelevant], and no
    sentence of it states the asked relation about the subject."""
    seen = 0
    for ex in train:
        if ex["kind"] != "missing":
            continue
        m = LAYOUT.match(ex["output"])
        assert m["rel"] == "Irrelevant" and m["sup"] == "No support / Contradictory"
        assert stated_answer(ex["instruction"], m["text"]) == [], ex
        seen += 1
    assert seen > 30


def test_gold_passages_state_the_answer_about_the_subject(train):
    for ex in train:
        if ex["kind"] != "gold":
            continue
        m = LAYOUT.match(ex["output"])
        values = stated_answer(ex["instruction"], m["text"])
        assert len(values) == 1 and values[0].lower() in m["ans"].lower(), ex


def test_closed_tasks_are_labelled_by_their_passage(train):
    claims = [ex for ex in train if ex["kind"] == "claim"]
    choices = [ex for ex in train if ex["kind"] == "choice"]
    assert len(claims) > 40 and len(choices) > 40
    checked = Counter()
    for ex in claims:
        m = LAYOUT.match(ex["output"])
        if m["rel"] != "Relevant":
            continue
        claim = ex["instruction"].split("## Input:\n\n")[1]
        names = (m["title"].lower(), "the " + m["title"].lower())
        (rel, subject, value), = [(r, s, v) for r in RELATIONS for s, v in statements(claim, r) if s in names]
        truth = [v for s, v in statements(m["text"], rel) if s == subject]
        assert len(truth) == 1, ex
        assert m["ans"] == ("true" if truth[0].lower() == value.lower() else "false"), ex
        checked[m["ans"]] += 1
    assert checked["true"] > 10 and checked["false"] > 10
    for ex in choices:
        m = LAYOUT.match(ex["output"])
        if m["rel"] != "Relevant":
            continue
        options = re.findall(r"\n([A-D]): ([^\n]*)", ex["instruction"])
        assert [x for x, _ in options] == list("ABCD")
        question = ex["instruction"].split("### Input:\n")[1].split("\n")[0]
        (value,) = stated_answer(question, m["text"])
        assert dict(options)[m["ans"]].lower() == value.lower(), ex


def test_no_retrieval_answers_are_the_base_models_own(train):
    from selfrag.training.smollm2_data import DISTILLED, _load
    base = {r["instruction"]: r for r in _load(DISTILLED)}
    nr = [ex for ex in train if ex["kind"] == "no_retrieval"]
    assert len(nr) > 100
    for ex in nr:
        row = base[ex["instruction"]]
        assert ex["output"] == T.NO_RETRIEVAL + row["answer"] + T.UTILITY_TOKENS[4]
        assert not row["repetitive"]


def test_heldout_is_disjoint_from_training(train, heldout):
    train_q = {ex["instruction"] for ex in train}
    assert not train_q & {ex["instruction"] for ex in heldout}
    # phrasings: no held-out question template is ever used for training
    for rel in RELATIONS.values():
        assert len(rel.questions) >= 12
        for template in rel.questions[-HELDOUT_QUESTIONS:]:
            pattern = re.compile("^" + re.escape(template[:1].upper() + template[1:]).replace(r"\{s\}", ".+") + "$")
            assert not any(pattern.match(q) for q in train_q if q.endswith(template[-6:])), template
    # real facts: the held-out fifth never appears as a training question's passage
    held_titles = {r["title"] for r in realfacts("heldout")}
    for ex in train:
        if ex["kind"] in ("real_gold", "real_long_form"):
            assert LAYOUT.match(ex["output"])["title"] not in held_titles
    # names: held-out styles use letters the training styles never draw
    held_only = set("".join(names._INVENTORIES["turkic"][0] + names._INVENTORIES["turkic"][1])) - set(
        "".join(c for s in names.TRAIN_STYLES if s in names._INVENTORIES
                for part in names._INVENTORIES[s][:2] for c in "".join(part))) - set(names._DIACRITIC)
    assert "ı" in held_only and "ğ" in held_only
    assert not any("ı" in ex["output"] or "ğ" in ex["output"] for ex in train)


def test_realfacts_corpus_is_whole():
    records = realfacts()
    assert len(records) >= 200
    assert len({r["title"] for r in records}) == len(records)
    kinds = Counter(r["kind"] for r in records)
    assert {"country", "city", "person", "invention", "animal"} <= set(kinds)
    for r in records:
        assert 1 <= len(r["qa"]) <= 3
        for qa in r["qa"]:
            assert qa["answer"] in r["text"], (r["id"], qa)
    held = [r for r in records if heldout_record(r["id"])]
    assert 0.1 * len(records) < len(held) < 0.3 * len(records)
