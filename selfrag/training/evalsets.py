"""Held-out evaluation files for the miniature model, in the released eval layouts.

Every entity comes from ``heldout_world``: its names never occur in the
training world, so a fact can only be answered from a passage.

    python -m selfrag.training.evalsets --out benchmarks/data/heldout

writes (one JSON object per line):
* ``popqa_heldout.jsonl``: ``question``, ``answers``, ``ctxs`` (the gold passage
  and 4 distractors, shuffled), plus ``gold_ctx`` (its index) and ``relation``;
* ``pubhealth_heldout.jsonl``: claims with ``answers`` ``["true"]``/``["false"]``;
* ``arc_heldout.jsonl``: ``choices``, ``answerKey``;
* ``retrieval_decision.jsonl``: ``question`` and ``needs_retrieval`` (factual
  questions and instructions that need none, mixed);
* ``corpus_heldout.jsonl``: every passage above, for ``--retriever bm25``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from selfrag.training.data import heldout_world
from selfrag.training.examples import ExampleMaker
from selfrag.training.world import OPEN_RELATIONS, RELATIONS, _value, passage_text

NUM_POPQA, NUM_CLOSED, NUM_DECISION = 300, 100, 100
NO_RETRIEVAL_KINDS = ("copy", "reverse", "arithmetic", "list_items", "odd_one_out", "poem")


def _ctxs(world, ent, rel, rng):
    """The gold passage and 4 distractors (2 of them hard: same kind and relation), shuffled."""
    gold = {"title": ent.title, "text": passage_text(ent, rng, must=(rel.name,))}
    same = [e for e in world.entities[ent.kind] if e is not ent]
    others = [e for e in world.all() if e.kind != ent.kind]
    distract = rng.sample(same, 2) + rng.sample(others, 2)
    ctxs = [gold] + [{"title": d.title, "text": passage_text(d, rng, must=(rel.name,) if d.kind == ent.kind else ())}
                     for d in distract]
    order = list(range(5))
    rng.shuffle(order)
    return [ctxs[i] for i in order], order.index(0)


def _pick(world, rng, relations):
    rel = RELATIONS[rng.choice(relations)]
    return rel, rng.choice([e for k in rel.kinds for e in world.entities[k]])


def build(seed: int = 0) -> dict[str, list[dict]]:
    world = heldout_world(seed)
    rng = random.Random(f"eval-{seed}")
    popqa, fever, arc = [], [], []
    for _ in range(NUM_POPQA):
        rel, ent = _pick(world, rng, OPEN_RELATIONS)
        ctxs, gold = _ctxs(world, ent, rel, rng)
        popqa.append({"question": rel.question(ent, rng), "answers": [ent.facts[rel.name]],
                      "ctxs": ctxs, "gold_ctx": gold, "relation": rel.name})
    for _ in range(NUM_CLOSED):
        rel, ent = _pick(world, rng, tuple(RELATIONS))
        truth = rng.random() < 0.5
        value = ent.facts[rel.name]
        while not truth and value == ent.facts[rel.name]:
            value = _value(rel.name, rng)
        ctxs, gold = _ctxs(world, ent, rel, rng)
        fever.append({"question": rel.answer_sentence(ent, value),
                      "answers": ["true" if truth else "false"], "ctxs": ctxs, "gold_ctx": gold,
                      "relation": rel.name})
    for _ in range(NUM_CLOSED):
        rel, ent = _pick(world, rng, tuple(RELATIONS))
        options = [ent.facts[rel.name]]     # a list: set order varies between processes
        while len(options) < 4:
            v = _value(rel.name, rng)
            if v not in options:
                options.append(v)
        rng.shuffle(options)
        ctxs, gold = _ctxs(world, ent, rel, rng)
        arc.append({"question": rel.question(ent, rng),
                    "choices": {"text": options, "label": list("ABCD")},
                    "answerKey": "ABCD"[options.index(ent.facts[rel.name])], "ctxs": ctxs,
                    "gold_ctx": gold, "relation": rel.name})
    maker = ExampleMaker(world, random.Random(f"eval-instructions-{seed}"))
    decision = [{"question": r["question"], "needs_retrieval": True} for r in popqa[:NUM_DECISION]]
    for i in range(NUM_DECISION):
        instruction, _ = maker.make(NO_RETRIEVAL_KINDS[i % len(NO_RETRIEVAL_KINDS)])
        decision.append({"question": instruction, "needs_retrieval": False})
    random.Random(f"decision-{seed}").shuffle(decision)
    seen, corpus = set(), []
    for rec in popqa + fever + arc:
        for c in rec["ctxs"]:
            key = (c["title"], c["text"])
            if key not in seen:
                seen.add(key)
                corpus.append({"id": f"heldout-{len(corpus)}", "title": c["title"], "text": c["text"]})
    return {"popqa_heldout.jsonl": popqa, "pubhealth_heldout.jsonl": fever,
            "arc_heldout.jsonl": arc, "retrieval_decision.jsonl": decision,
            "corpus_heldout.jsonl": corpus}


def demo_corpus(seed: int = 0, per_kind: int = 2) -> list[dict]:
    """Passages about made-up entities for the embedded BM25 corpus (``fictional-*``
    ids): every fact of ``per_kind`` entities per kind, none of them in training."""
    import random as _random

    from selfrag.training.data import training_world
    from selfrag.training.world import World

    world = World.build(_random.Random(f"demo-{seed}"), per_kind, avoid=training_world(seed).names())
    rng = _random.Random(f"demo-text-{seed}")
    return [{"id": f"fictional-{i:03d}", "title": e.title,
             "text": passage_text(e, rng, must=tuple(e.facts), extra=0)}
            for i, e in enumerate(world.all())]


def write_files(out_dir: str | Path, files: dict[str, list[dict]]) -> list[Path]:
    """Writes each file's rows as JSON lines (UTF-8) under ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in files.items():
        p = out / name
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(p)
    return paths


def write(out_dir: str | Path, seed: int = 0) -> list[Path]:
    return write_files(out_dir, build(seed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m selfrag.training.evalsets", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, metavar="DIR")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in write(args.out, args.seed):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
