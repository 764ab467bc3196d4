"""Held-out evaluation files for the Self-RAG SmolLM2, in the released eval layouts.

    python -m selfrag.training.smollm2_evalsets [--out benchmarks/data/heldout_smollm2]

Everything is drawn from what training never drew (``smollm2_data``'s held-out split:
name styles, the last two phrasings of each relation, a fifth of the real-fact passages
and of the instructions):

* ``popqa_heldout.jsonl``: 150 questions about made-up entities and 100 about real
  facts, each with five ``ctxs``: the gold passage and four distractors of the same
  kind (made-up distractors state the *same relation* about other entities), shuffled;
  ``gold_ctx`` is the gold's index. ``answers`` hold the value as a passage may write it
  (a value opening a sentence is capitalised).
* ``pubhealth_heldout.jsonl`` (200 claims, half true) and ``arc_heldout.jsonl`` (200
  four-way choices), each with the gold passage among four distractors.
* ``retrieval_decision.jsonl``: 200 questions that need retrieval (made-up, real, and
  real-entity questions) and every held-out instruction that needs none.
* ``no_retrieval_heldout.jsonl``: held-out instructions with the base model's own
  answers (``smollm2_distilled.jsonl``), for the perplexity comparison.
* ``corpus_heldout.jsonl``: every passage above, for retrieval by BM25.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from selfrag.training.evalsets import write_files
from selfrag.training.relations import KIND_RELATIONS, KINDS, _value, cap, entity, passage
from selfrag.training.smollm2_data import DISTILLED, RETRIEVAL_INSTRUCTIONS, _load, heldout_record, realfacts

OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "heldout_smollm2"
SPLIT = "heldout"


def _ctx(title: str, text: str) -> dict:
    return {"title": title, "text": text}


def _with_distractors(gold: dict, distractors: list[dict], rng: random.Random) -> tuple[list[dict], int]:
    ctxs = [gold, *distractors]
    rng.shuffle(ctxs)
    return ctxs, ctxs.index(gold)


def _made_up_item(rng: random.Random, must_relation: bool = True):
    ent = entity(rng.choice(KINDS), rng, SPLIT)
    rel = rng.choice(KIND_RELATIONS[ent.kind])
    text, _ = passage(ent, rng, SPLIT, must=(rel.name,))
    distractors = []
    for _ in range(4):
        other = entity(ent.kind, rng, SPLIT)
        distractors.append(_ctx(other.title, passage(other, rng, SPLIT, must=(rel.name,) if must_relation else ())[0]))
    return ent, rel, _ctx(ent.title, text), distractors


def _answers(value: str) -> list[str]:
    return sorted({value, cap(value)})


def _trained_questions() -> set[str]:
    """Real-entity questions training asks (the retrieval list's training part): a held-out
    real-fact question that happens to be among them is left out."""
    return {r["instruction"] for r in _load(RETRIEVAL_INSTRUCTIONS) if not heldout_record(r["id"])}


def popqa(rng: random.Random, made_up: int = 150, real: int = 100) -> list[dict]:
    rows = []
    for _ in range(made_up):
        ent, rel, gold, distractors = _made_up_item(rng)
        ctxs, gi = _with_distractors(gold, distractors, rng)
        rows.append({"question": rel.question(ent, rng, SPLIT), "answers": _answers(ent.facts[rel.name]),
                     "ctxs": ctxs, "gold_ctx": gi, "source": "made-up"})
    held = realfacts(SPLIT)
    pool = realfacts()
    trained = _trained_questions()
    pairs = [(r, qa) for r in held for qa in r["qa"] if qa["question"] not in trained]
    rng.shuffle(pairs)
    for r, qa in pairs[:real]:
        same = [o for o in pool if o["kind"] == r["kind"] and o["title"] != r["title"]]
        ctxs, gi = _with_distractors(_ctx(r["title"], r["text"]),
                                     [_ctx(o["title"], o["text"]) for o in rng.sample(same, 4)], rng)
        rows.append({"question": qa["question"], "answers": [qa["answer"]], "ctxs": ctxs, "gold_ctx": gi,
                     "source": "real"})
    return rows


def pubhealth(rng: random.Random, n: int = 200) -> list[dict]:
    rows = []
    for i in range(n):
        ent, rel, gold, distractors = _made_up_item(rng)
        truth = i % 2 == 0
        value = ent.facts[rel.name]
        while not truth and value == ent.facts[rel.name]:
            value = _value(rel.name, rng, SPLIT)
        ctxs, gi = _with_distractors(gold, distractors, rng)
        rows.append({"question": rel.sentence(ent, rng, value), "answers": ["true" if truth else "false"],
                     "ctxs": ctxs, "gold_ctx": gi})
    return rows


def arc(rng: random.Random, n: int = 200) -> list[dict]:
    rows = []
    for i in range(n):
        ent, rel, gold, distractors = _made_up_item(rng)
        options = [ent.facts[rel.name]]
        while len(options) < 4:
            v = _value(rel.name, rng, SPLIT)
            if v not in options:
                options.append(v)
        rng.shuffle(options)
        key = "ABCD"[options.index(ent.facts[rel.name])]
        ctxs, gi = _with_distractors(gold, distractors, rng)
        rows.append({"question": rel.question(ent, rng, SPLIT), "choices": {"text": options, "label": list("ABCD")},
                     "answerKey": key, "ctxs": ctxs, "gold_ctx": gi})
    return rows


def retrieval_decision(rng: random.Random, made_up: int = 100, real: int = 70) -> list[dict]:
    rows = []
    for _ in range(made_up):
        ent, rel, _, _ = _made_up_item(rng)
        rows.append({"question": rel.question(ent, rng, SPLIT), "needs_retrieval": True})
    trained = _trained_questions()
    pairs = [qa["question"] for r in realfacts(SPLIT) for qa in r["qa"] if qa["question"] not in trained]
    rows += [{"question": q, "needs_retrieval": True} for q in rng.sample(pairs, real)]
    held_q = [r["instruction"] for r in _load(RETRIEVAL_INSTRUCTIONS) if heldout_record(r["id"])]
    rows += [{"question": q, "needs_retrieval": True} for q in held_q[:200 - len(rows)]]
    rows += [{"question": r["instruction"], "needs_retrieval": False} for r in no_retrieval()]
    rng.shuffle(rows)
    return rows


def no_retrieval() -> list[dict]:
    """Held-out instructions and the base's own answers (loops excluded, as in training)."""
    return [{"id": r["id"], "instruction": r["instruction"], "answer": r["answer"]} for r in _load(DISTILLED)
            if heldout_record(r["id"]) and r["answer"] and not r["repetitive"]]


def build(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(f"smollm2-eval-{seed}")
    files = {"popqa_heldout.jsonl": popqa(rng), "pubhealth_heldout.jsonl": pubhealth(rng),
             "arc_heldout.jsonl": arc(rng), "retrieval_decision.jsonl": retrieval_decision(rng),
             "no_retrieval_heldout.jsonl": no_retrieval()}
    seen, corpus = set(), []
    for name in ("popqa_heldout.jsonl", "pubhealth_heldout.jsonl", "arc_heldout.jsonl"):
        for row in files[name]:
            for c in row["ctxs"]:
                if (c["title"], c["text"]) not in seen:
                    seen.add((c["title"], c["text"]))
                    corpus.append(c)
    files["corpus_heldout.jsonl"] = corpus
    return files


def write(out: str | Path = OUT, seed: int = 0) -> list[Path]:
    return write_files(out, build(seed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in write(args.out, args.seed):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
