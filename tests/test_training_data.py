"""The miniature model's data generator against the reflection grammar, its
determinism, the loss mask, the held-out split, and a trainer smoke run."""
from __future__ import annotations

import json
import random

import pytest

from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
from selfrag import tokens as T
from selfrag.constraints import ReflectionConstraint
from selfrag.default_model import random_model_dir
from selfrag.prompts import format_prompt
from selfrag.training import evalsets
from selfrag.training.data import IGNORE, data_hash, encode_example, grammar_violation, heldout_world, training_world
from selfrag.training.examples import KIND_WEIGHTS, RETRIEVAL_KINDS, generate
from selfrag.training.world import RELATIONS, World
from selfrag.vocab import ReflectionVocab

SMALL = 60          # entities per kind: enough variety, fast to build


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(random_model_dir())


@pytest.fixture(scope="module")
def constraint(tokenizer):
    return ReflectionConstraint(ReflectionVocab.from_tokenizer(tokenizer), len(tokenizer))


@pytest.fixture(scope="module")
def world():
    return World.build(random.Random("test"), SMALL)


def test_generator_is_deterministic(world):
    a = list(generate(world, 300, seed=5))
    b = list(generate(World.build(random.Random("test"), SMALL), 300, seed=5))
    assert a == b and data_hash(a) == data_hash(b)
    c = list(generate(world, 300, seed=6))
    assert data_hash(c) != data_hash(a)


def test_data_hash_is_the_same_in_another_process():
    """No set or hash order leaks into the data: two processes with different
    PYTHONHASHSEED generate the same examples."""
    import os
    import subprocess
    import sys
    code = ("import random; from selfrag.training.world import World; "
            "from selfrag.training.examples import generate; from selfrag.training.data import data_hash; "
            "print(data_hash(generate(World.build(random.Random('test'), 60), 400, seed=5)))")
    hashes = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
              for seed in ("1", "2")}
    assert len(hashes) == 1


def test_every_kind_appears_and_follows_the_grammar(world, tokenizer, constraint):
    examples = list(generate(world, 3000, seed=1))
    assert {e["dataset_name"] for e in examples} == set(KIND_WEIGHTS)
    for ex in examples:
        assert ex["output"].endswith("</s>")
        ids = tokenizer.encode(ex["output"], add_special_tokens=False)
        problem = grammar_violation(constraint, ids)
        assert problem is None, f"{ex['id']}: {problem}\n{ex['output']}"
        first = ids[0]
        expect = T.RETRIEVAL if ex["dataset_name"] in RETRIEVAL_KINDS else T.NO_RETRIEVAL
        assert first == tokenizer.convert_tokens_to_ids(expect), ex["id"]


def test_the_grammar_check_rejects_broken_outputs(tokenizer, constraint):
    good = "[Retrieval]<paragraph>Zor\nZor is a town.</paragraph>[Relevant]Yes.[Fully supported][Utility:5]</s>"
    assert grammar_violation(constraint, tokenizer.encode(good, add_special_tokens=False)) is None
    for bad in (good.replace("[Relevant]", ""),                       # no relevance token
                good.replace("[Utility:5]</s>", "[Utility:5]"),        # never ends
                "[No Retrieval]text[Fully supported][Utility:5]</s>",  # support without evidence
                "text[Utility:5]</s>"):                                 # no retrieval decision
        assert grammar_violation(constraint, tokenizer.encode(bad, add_special_tokens=False)), bad


def test_relations_cover_the_issue_list():
    needed = {"capital", "founder", "founded", "built", "location", "inventor", "population",
              "language", "diet", "height", "length", "known_for", "used_for"}
    assert needed <= set(RELATIONS)
    for rel in RELATIONS.values():
        assert len(rel.questions) >= 3 and len(rel.passage) >= 3, rel.name
        assert rel.questions[0].startswith(("What", "Who", "When", "Where", "How")), rel.name
    assert RELATIONS["capital"].questions[0] == "What is the capital of {s}?"


def test_loss_mask_covers_prompt_and_passage_only(tokenizer):
    ex = {"id": "x", "instruction": "What is the capital of Zor?",
          "output": "[Retrieval]<paragraph>Zor\nThe capital of Zor is Bam.</paragraph>"
                    "[Relevant]The capital of Zor is Bam.[Fully supported][Utility:5]</s>"}
    ids, labels = encode_example(tokenizer, ex)
    n_prompt = len(tokenizer.encode(format_prompt(ex["instruction"])))
    tid = tokenizer.convert_tokens_to_ids
    assert all(lab == IGNORE for lab in labels[:n_prompt])
    p_open, p_close = ids.index(tid(T.PARAGRAPH_START)), ids.index(tid(T.PARAGRAPH_END))
    assert all(lab == IGNORE for lab in labels[p_open + 1:p_close + 1])
    # Everything else (the retrieval decision, the <paragraph> that must follow it,
    # critique tokens, answer, </s>) is learned.
    kept = [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert p_open == n_prompt + 1
    assert kept == [n_prompt, p_open] + list(range(p_close + 1, len(ids)))
    assert [labels[i] for i in kept] == [ids[i] for i in kept]
    assert ids[-1] == 2 and ids[n_prompt] == tid(T.RETRIEVAL)


def test_heldout_entities_never_appear_in_training():
    train = training_world(3, per_kind=150)
    held = heldout_world(3, per_kind=40, train_per_kind=150)
    assert not train.names() & held.names()
    assert len(held.names()) == 40 * len(held.entities)


def test_eval_files_use_the_released_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(evalsets, "NUM_POPQA", 12)
    monkeypatch.setattr(evalsets, "NUM_CLOSED", 6)
    monkeypatch.setattr(evalsets, "NUM_DECISION", 6)
    monkeypatch.setattr(evalsets, "heldout_world", lambda seed: heldout_world(seed, 20, 100))
    from selfrag.evaluate import load_eval_file
    paths = {p.name: p for p in evalsets.write(tmp_path)}
    pop = load_eval_file(paths["popqa_heldout.jsonl"], "popqa")
    for rec in pop:
        gold = rec.raw["gold_ctx"]
        assert len(rec.passages) == 5
        assert rec.golds[0] in rec.passages[gold].text
        assert rec.passages[gold].title in rec.question
    arc = load_eval_file(paths["arc_heldout.jsonl"], "arc_c")
    assert all(r.golds[0] in "ABCD" for r in arc)
    fever = load_eval_file(paths["pubhealth_heldout.jsonl"], "pubhealth")
    assert {r.golds[0] for r in fever} <= {"true", "false"}
    decision = [json.loads(x) for x in paths["retrieval_decision.jsonl"].read_text().splitlines()]
    assert sum(d["needs_retrieval"] for d in decision) == 6 and len(decision) == 12


def test_committed_popqa_file_distractors_rarely_hold_the_answer():
    """A distractor may state the gold value by chance (a year, a short name): 1 of the
    300 committed records does. More would let a wrong passage score a match."""
    from selfrag.evaluate import load_eval_file
    from tests.test_miniature_model import HELDOUT
    recs = load_eval_file(HELDOUT / "popqa_heldout.jsonl", "popqa")
    leaky = sum(any(r.golds[0] in p.text for j, p in enumerate(r.passages) if j != r.raw["gold_ctx"])
                for r in recs)
    assert len(recs) == 300 and leaky <= 3


def test_training_smoke_run_learns(tmp_path):
    """The trainer end to end at toy size (about 10 s): the loss falls well below
    its start, and the engine loads and runs what it wrote."""
    from engine import SamplingParams
    from selfrag.training.train import RECIPE, SMOKE, replay_data_hash, train
    from tests.helpers import make_llm

    recipe = {**RECIPE, **SMOKE, "model": {**RECIPE["model"], **SMOKE["model"]}}
    meta = train(tmp_path, recipe, progress=False)
    assert meta["final_loss_ema"] < 0.6 * meta["first_loss"], meta["curve"]
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["train_data_sha256"] == meta["train_data_sha256"]
    # The recorded hash is the hash of the examples the generator yields (replayed without training).
    assert replay_data_hash(recipe, meta["updates"]) == meta["train_data_sha256"]
    assert set(saved["files_sha256"]) >= {"config.json", "tokenizer.model"}
    llm = make_llm(str(tmp_path), dtype="float32")
    out = llm.generate([format_prompt("What is 2 plus 3?")],
                       SamplingParams(temperature=0.0, max_tokens=4, skip_special_tokens=False))
    assert len(out[0].outputs[0].token_ids) >= 1
