"""Training data for a Self-RAG SmolLM2: reading, judging and answering, not syllables.

``make_examples(n, seed, split)`` draws Self-RAG examples (``{"id", "kind",
"instruction", "output"}``: the output is the response after ``### Response:\\n``,
without the end-of-sequence token, which the encoder appends) of these kinds:

* **Made-up entities** (``selfrag.training.relations``): names from wide distributions
  (``selfrag.training.names``), at least 12 question phrasings per relation, passages
  with the entity's other facts, fillers and *distractor* sentences that state the same
  relation about other entities. Open questions (PopQA-style) with the gold passage,
  with another entity's passage (``[Irrelevant]``), with the entity's passage lacking
  the fact (``[Irrelevant]``: the passage does not answer), two questions of which the
  passage answers one (``[Partially supported]``); PubHealth-style true/false claims and
  ARC-style multiple choice answered by letter (``selfrag.prompts.task_instruction``);
  long-form descriptions over two passages with ``[Continue to Use Evidence]``.
* **Real facts** (``selfrag/data/realfacts.jsonl``, our own sentences): questions with
  their passage (answered with the passage's sentence that holds the answer, or the
  short answer), with another passage (``[Irrelevant]``), and "tell me about" answers.
* **No retrieval** (``selfrag/data/smollm2_distilled.jsonl``): everyday instructions
  answered with the base model's own greedy answer (self-distillation, see
  ``selfrag.training.distill``) as ``[No Retrieval]answer[Utility:5]``, so fine-tuning
  keeps SmolLM2's chat ability instead of teaching templates.
* **Retrieval decisions** on real-looking questions about named entities
  (``selfrag/data/instructions_retrieval.jsonl``) with an unrelated passage.

Relevance means the passage answers the question: ``[Relevant]`` only then.

**Held out from the start** (``split="heldout"``): the name styles of
``names.HELDOUT_STYLES``, the last two phrasings of every relation, and a fifth of
the real-fact records, the instructions and the retrieval questions (by a hash of their
id) are never drawn for ``split="train"``.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from pathlib import Path

from selfrag import tokens as T
from selfrag.prompts import task_instruction
from selfrag.training.relations import KIND_RELATIONS, KINDS, RELATIONS, _value, cap, entity, passage, split_sentences

DATA = Path(__file__).resolve().parents[1] / "data"
REALFACTS = DATA / "realfacts.jsonl"
DISTILLED = DATA / "smollm2_distilled.jsonl"
NO_RETRIEVAL_INSTRUCTIONS = DATA / "instructions_no_retrieval.jsonl"
RETRIEVAL_INSTRUCTIONS = DATA / "instructions_retrieval.jsonl"
USE = T.UTILITY_TOKENS
NO_ANSWER = ("I cannot tell: ", "The passage does not answer this: ")
TELL_ME = ("Tell me about {s}.", "Write a short description of {s}.", "What do you know about {s}?",
           "Give me a short overview of {s}.", "Describe {s} in a few sentences.")
TELL_ME_HELDOUT = ("Could you summarise what is known about {s}?", "I'd like a brief profile of {s}.")

REAL_SENTENCE_ANSWERS = 0.4
# Run 1 (issue 29) drew gold 20, irrelevant 8, missing 6, partial 3, claim 7, choice 7,
# long_form 5, real_gold 12, real_irrelevant 5, real_long_form 3, no_retrieval 20,
# retrieval_question 4. On held-out prompts its decisions and layout were right but the
# entity's own passage lacking the fact was judged [Relevant] every time, real-fact answers
# were right 58% of the time and the closed tasks were at chance; those kinds get more.
KIND_WEIGHTS = {
    "gold": 16, "irrelevant": 7, "missing": 14, "partial": 3, "claim": 11, "choice": 13, "long_form": 4,
    "real_gold": 16, "real_irrelevant": 5, "real_long_form": 2, "no_retrieval": 14, "retrieval_question": 4,
}


def heldout_record(record_id: str) -> bool:
    """A fifth of every hand-written list is held out, by a hash of the record's id."""
    return int(hashlib.sha256(record_id.encode()).hexdigest(), 16) % 5 == 0


def _split_records(records: list, split: str) -> list:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [r for r in records if heldout_record(r["id"]) == (split == "heldout")]


@lru_cache(maxsize=None)
def _load(path: Path) -> tuple:
    if not path.is_file():
        hint = " (python -m selfrag.training.distill writes it)" if path == DISTILLED else ""
        raise FileNotFoundError(f"{path}: missing{hint}")
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def realfacts(split: str | None = None) -> list:
    records = list(_load(REALFACTS))
    return records if split is None else _split_records(records, split)


def block(title: str, text: str) -> str:
    """One retrieved passage as the pipeline appends it (``selfrag.prompts.format_passage``)."""
    return f"{T.RETRIEVAL}{T.PARAGRAPH_START}{title}\n{text}{T.PARAGRAPH_END}"


def _sentence_with(text: str, answer: str) -> str:
    """The (first) sentence of ``text`` that holds ``answer``; the answer itself if it spans two."""
    return next((s for s in split_sentences(text) if answer in s), answer + ".")


class ExampleMaker:
    """Draws examples of one ``split``; ``make(kind)`` -> (instruction, output)."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split = rng, split
        self.facts = realfacts(split)
        self.all_facts = realfacts()
        # Answers caught in a greedy loop are never trained on (``distill.repetitive``).
        self.distilled = [r for r in _load(DISTILLED) if heldout_record(r["id"]) == (split == "heldout")
                          and r["answer"] and not r["repetitive"]]
        self.retrieval_questions = _split_records(list(_load(RETRIEVAL_INSTRUCTIONS)), split)

    def _ent(self, kind: str | None = None):
        return entity(kind or self.rng.choice(KINDS), self.rng, self.split)

    def _fact(self):
        ent = self._ent()
        return ent, self.rng.choice(KIND_RELATIONS[ent.kind])

    def _q(self, rel, ent) -> str:
        return rel.question(ent, self.rng, self.split)

    def _other_passage(self, ent) -> tuple[str, str]:
        rng = self.rng
        if rng.random() < 0.25:
            r = rng.choice(self.all_facts)
            return r["title"], r["text"]
        other = self._ent(ent.kind if rng.random() < 0.7 else None)
        return other.title, passage(other, rng, self.split)[0]

    # ---- made-up entities --------------------------------------------------------
    def gold(self):
        ent, rel = self._fact()
        text, _ = passage(ent, self.rng, self.split, must=(rel.name,))
        return self._q(rel, ent), (block(ent.title, text) + T.RELEVANT + rel.answer(ent, self.rng)
                                   + T.FULLY_SUPPORTED + USE[4])

    def _no_answer(self, ent, rel) -> str:
        return self.rng.choice(NO_ANSWER) + rel.hedge(ent)

    def irrelevant(self):
        ent, rel = self._fact()
        title, text = self._other_passage(ent)
        return self._q(rel, ent), (block(title, text) + T.IRRELEVANT + self._no_answer(ent, rel)
                                   + T.NO_SUPPORT + USE[self.rng.choice((0, 1))])

    def missing(self):
        ent, rel = self._fact()
        text, _ = passage(ent, self.rng, self.split, drop=(rel.name,), distractors=self.rng.choice((0, 1)))
        return self._q(rel, ent), (block(ent.title, text) + T.IRRELEVANT + self._no_answer(ent, rel)
                                   + T.NO_SUPPORT + USE[1])

    def partial(self):
        rng = self.rng
        ent = self._ent(rng.choice([k for k in KINDS if len(KIND_RELATIONS[k]) >= 2]))
        a, b = rng.sample(KIND_RELATIONS[ent.kind], 2)
        q = f"{self._q(a, ent)} {self._q(b, ent)}"
        text, _ = passage(ent, rng, self.split, must=(a.name,), drop=(b.name,), distractors=0)
        return q, (block(ent.title, text) + T.RELEVANT + a.answer(ent, rng) + " " + cap(b.hedge(ent))
                   + T.PARTIALLY_SUPPORTED + USE[2])

    def claim(self):
        """PubHealth-style: is the claim true, judged against the passage."""
        rng = self.rng
        ent, rel = self._fact()
        truth = rng.random() < 0.5
        value = ent.facts[rel.name]
        while not truth and value == ent.facts[rel.name]:
            value = _value(rel.name, rng, self.split)
        instruction = task_instruction("pubhealth", rel.sentence(ent, rng, value))
        if rng.random() < 0.8:
            text, _ = passage(ent, rng, self.split, must=(rel.name,))
            return instruction, (block(ent.title, text) + T.RELEVANT + ("true" if truth else "false")
                                 + T.FULLY_SUPPORTED + USE[4])
        title, text = self._other_passage(ent)
        return instruction, (block(title, text) + T.IRRELEVANT + rng.choice(("true", "false"))
                             + T.NO_SUPPORT + USE[0])

    def choice(self):
        """ARC-style: four candidates of the relation's kind, answered by letter."""
        rng = self.rng
        ent, rel = self._fact()
        gold = ent.facts[rel.name]
        options = [gold]
        while len(options) < 4:
            v = _value(rel.name, rng, self.split)
            if v not in options:
                options.append(v)
        rng.shuffle(options)
        key = "ABCD"[options.index(gold)]
        instruction = task_instruction("arc_c", self._q(rel, ent), {"text": options, "label": list("ABCD")})
        if rng.random() < 0.8:
            text, _ = passage(ent, rng, self.split, must=(rel.name,))
            return instruction, (block(ent.title, text) + T.RELEVANT + key + T.FULLY_SUPPORTED + USE[4])
        title, text = self._other_passage(ent)
        return instruction, (block(title, text) + T.IRRELEVANT + rng.choice("ABCD") + T.NO_SUPPORT + USE[0])

    def _tell_me(self, subject: str) -> str:
        pool = TELL_ME if self.split == "train" else TELL_ME_HELDOUT
        return cap(self.rng.choice(pool).format(s=subject))

    def long_form(self):
        rng = self.rng
        ent = self._ent()
        rels = [r.name for r in KIND_RELATIONS[ent.kind]]
        rng.shuffle(rels)
        first, second = rels[:max(1, len(rels) - 1)], rels[max(1, len(rels) - 1):]
        text, sents = passage(ent, rng, self.split, must=tuple(first), drop=tuple(second), distractors=0)
        out = block(ent.title, text) + T.RELEVANT
        out += (T.FULLY_SUPPORTED + T.CONTINUE_RETRIEVAL).join(sents[r] for r in first) + T.FULLY_SUPPORTED
        if second:
            text, sents = passage(ent, rng, self.split, must=tuple(second), drop=tuple(first), distractors=0)
            out += block(ent.title, text) + T.RELEVANT + sents[second[0]] + T.FULLY_SUPPORTED
        return self._tell_me(ent.name), out + USE[4]

    # ---- real facts -----------------------------------------------------------------
    def real_gold(self):
        rng = self.rng
        r = rng.choice(self.facts)
        qa = rng.choice(r["qa"])
        # The sentence that holds the answer, or (more often) the short answer itself: run 1
        # (60% sentences) often copied the passage's first sentence instead of the asked fact.
        answer = _sentence_with(r["text"], qa["answer"]) if rng.random() < REAL_SENTENCE_ANSWERS else qa["answer"] + "."
        return qa["question"], (block(r["title"], r["text"]) + T.RELEVANT + answer + T.FULLY_SUPPORTED + USE[4])

    def real_irrelevant(self):
        rng = self.rng
        r = rng.choice(self.facts)
        other = rng.choice(self.all_facts)
        while other["title"] == r["title"]:
            other = rng.choice(self.all_facts)
        return rng.choice(r["qa"])["question"], (
            block(other["title"], other["text"]) + T.IRRELEVANT + "The passage does not answer this question."
            + T.NO_SUPPORT + USE[0])

    def real_long_form(self):
        rng = self.rng
        r = rng.choice(self.facts)
        sents = split_sentences(r["text"])
        k = min(len(sents), rng.choice((1, 2, 2, 3)))
        body = (T.FULLY_SUPPORTED + T.CONTINUE_RETRIEVAL).join(sents[:k])
        return self._tell_me(r["title"]), (block(r["title"], r["text"]) + T.RELEVANT + body
                                           + T.FULLY_SUPPORTED + USE[4])

    # ---- retrieval decisions ---------------------------------------------------------
    def no_retrieval(self):
        r = self.rng.choice(self.distilled)
        return r["instruction"], T.NO_RETRIEVAL + r["answer"] + USE[4]

    def retrieval_question(self):
        rng = self.rng
        q = rng.choice(self.retrieval_questions)["instruction"]
        other = rng.choice(self.all_facts)
        return q, (block(other["title"], other["text"]) + T.IRRELEVANT
                   + "The passage does not answer this question." + T.NO_SUPPORT + USE[0])

    def make(self, kind: str) -> tuple[str, str]:
        return getattr(self, kind)()


def make_examples(n: int, seed: int, split: str = "train", weights: dict | None = None) -> list[dict]:
    """``n`` examples, deterministic in (``seed``, ``split``, ``weights``)."""
    weights = weights or KIND_WEIGHTS
    unknown = set(weights) - set(KIND_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown example kinds {sorted(unknown)}; known: {sorted(KIND_WEIGHTS)}")
    rng = random.Random(f"smollm2-{split}-{seed}")
    maker = ExampleMaker(rng, split)
    kinds, w = list(weights), list(weights.values())
    out = []
    for i in range(n):
        kind = rng.choices(kinds, w)[0]
        instruction, output = maker.make(kind)
        out.append({"id": f"{split}-{seed}-{i}", "kind": kind, "instruction": instruction, "output": output})
    return out


__all__ = ["make_examples", "realfacts", "heldout_record", "ExampleMaker", "KIND_WEIGHTS", "RELATIONS", "block"]
