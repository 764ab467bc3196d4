"""The Self-RAG SmolLM2's held-out eval files (selfrag/training/smollm2_evalsets.py): the
released layouts, the gold passage the only one that answers, labels that follow the gold
passage, nothing shared with training, and the committed files equal to a rebuild."""
from __future__ import annotations

import json

import pytest

from selfrag.evaluate import parse_record
from selfrag.training.relations import RELATIONS, stated_answer, statements
from selfrag.training.smollm2_data import make_examples
from selfrag.training.smollm2_evalsets import OUT, build


@pytest.fixture(scope="module")
def files():
    return build(0)


def test_layouts_and_sizes(files):
    assert len(files["popqa_heldout.jsonl"]) == 250 and len(files["pubhealth_heldout.jsonl"]) == 200
    assert len(files["arc_heldout.jsonl"]) == 200
    for name, task in (("popqa_heldout.jsonl", "popqa"), ("pubhealth_heldout.jsonl", "pubhealth"),
                       ("arc_heldout.jsonl", "arc_c")):
        for i, row in enumerate(files[name]):
            rec = parse_record(row, task, f"{name}[{i}]")          # the released layout parses
            assert len(rec.passages) == 5 and 0 <= row["gold_ctx"] < 5
    decisions = files["retrieval_decision.jsonl"]
    assert sum(r["needs_retrieval"] for r in decisions) == 200 and len(decisions) > 250


def test_only_the_gold_passage_answers(files):
    for row in files["popqa_heldout.jsonl"]:
        if row["source"] != "made-up":
            gold = row["ctxs"][row["gold_ctx"]]["text"]
            assert row["answers"][0] in gold
            continue
        for i, c in enumerate(row["ctxs"]):
            said = stated_answer(row["question"], c["text"])
            if i == row["gold_ctx"]:
                assert len(said) == 1 and said[0] in row["answers"], row
            else:
                assert said == [], row


def test_closed_labels_follow_the_gold_passage(files):
    for row in files["pubhealth_heldout.jsonl"]:
        gold = row["ctxs"][row["gold_ctx"]]
        names = (gold["title"].lower(), "the " + gold["title"].lower())
        (rel, subject, value), = [(r, s, v) for r in RELATIONS for s, v in statements(row["question"], r)
                                  if s in names]
        truth = [v for s, v in statements(gold["text"], rel) if s == subject]
        assert row["answers"] == ["true" if truth[0].lower() == value.lower() else "false"], row
    assert sum(r["answers"] == ["true"] for r in files["pubhealth_heldout.jsonl"]) == 100
    for row in files["arc_heldout.jsonl"]:
        (value,) = stated_answer(row["question"], row["ctxs"][row["gold_ctx"]]["text"])
        key = row["choices"]["label"].index(row["answerKey"])
        assert row["choices"]["text"][key].lower() == value.lower()


def test_nothing_is_shared_with_training(files):
    train_q = {ex["instruction"] for ex in make_examples(4000, seed=0)}
    for name in ("popqa_heldout.jsonl", "retrieval_decision.jsonl"):
        assert not train_q & {r["question"] for r in files[name]}
    train_nr = {ex["instruction"] for ex in make_examples(4000, seed=0, weights={"no_retrieval": 1})}
    assert not train_nr & {r["instruction"] for r in files["no_retrieval_heldout.jsonl"]}


def test_committed_files_are_the_build(files):
    for name, rows in files.items():
        with open(OUT / name, encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == rows, name
