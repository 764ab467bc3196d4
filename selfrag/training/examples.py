"""Self-RAG training examples in the released format, drawn from a ``World``.

Answers supported by a passage repeat the passage's own sentence for the asked
fact (the passage words it in one of several ways; the answer copies it).  A
first recipe answered with a fixed template instead and, after 3000 steps, still
garbled made-up names ("Sone Tower" -> "Sindur Tower"): copying one value gives
too little signal for the model to learn to copy; copying whole sentences gives a
lot.

Each example is ``{"id", "dataset_name", "instruction", "output"}``: the model
sees ``format_prompt(instruction)`` followed by ``output``, which carries the
reflection tokens and, for retrieval examples, the passage between
``<paragraph>`` and ``</paragraph>`` (masked out of the loss by the trainer).
The kinds follow the paper's training data (see ``KIND_WEIGHTS``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from selfrag import tokens as T
from selfrag.prompts import task_instruction
from selfrag.training.world import (
    OPEN_RELATIONS,
    RELATIONS,
    World,
    _value,
    cap,
    name,
    passage_sentences,
    passage_text,
    word,
)

CORPUS_JSONL = Path(__file__).resolve().parents[1] / "data" / "corpus.jsonl"
USE = [f"[Utility:{i}]" for i in range(1, 6)]

# Model card question with the model card's paragraph (demo prompt 3).
LLAMA_QUESTIONS = ("Can you tell me the difference between llamas and alpacas?",
                   "What is the difference between llamas and alpacas?",
                   "How are llamas and alpacas different?")
ALPACA_PARAGRAPH = (
    "The alpaca (Lama pacos) is a species of South American camelid mammal. It is similar to, "
    "and often confused with, the llama. Alpacas are considerably smaller than llamas, and unlike "
    "llamas, they were not bred to be working animals, but were bred specifically for their fiber.")
ALPACA_ANSWER = ("Alpacas are considerably smaller than llamas, and unlike llamas, they were not "
                 "bred to be working animals, but were bred specifically for their fiber.")

CATEGORIES = {
    "fruits": ("apple", "pear", "plum", "cherry", "banana", "grape", "peach", "lemon"),
    "animals": ("dog", "cat", "horse", "cow", "sheep", "rabbit", "goat", "mouse"),
    "colours": ("red", "blue", "green", "yellow", "black", "white", "orange", "purple"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "spade", "rake", "axe"),
    "vegetables": ("carrot", "potato", "onion", "pea", "bean", "cabbage", "leek", "turnip"),
    "instruments": ("piano", "violin", "flute", "drum", "guitar", "harp", "trumpet", "cello"),
    "social apps": ("twitter", "instagram", "whatsapp", "facebook", "telegram", "tiktok"),
}
POEM_TOPICS = ("the sea", "the moon", "rain", "the wind", "autumn", "a garden", "the river",
               "the snow", "a cat", "the stars", "spring", "the forest")
POEM_WORDS = ("quiet", "bright", "gentle", "cold", "soft", "deep", "wild", "calm", "old", "slow")


def _passage(title: str | None, text: str) -> str:
    body = text if title is None else f"{title}\n{text}"
    return f"{T.RETRIEVAL}{T.PARAGRAPH_START}{body}{T.PARAGRAPH_END}"


def _title(ent, rng) -> str | None:
    return None if rng.random() < 0.1 else ent.title


def _other(world: World, ent, rng, same_kind: bool = True):
    pool = world.entities[ent.kind] if same_kind else world.all()
    while True:
        o = rng.choice(pool)
        if o is not ent:
            return o


class ExampleMaker:
    """Draws examples of each kind from one world; ``make(kind)`` -> (instruction, output)."""

    def __init__(self, world: World, rng: random.Random, corpus: list | None = None):
        self.world, self.rng = world, rng
        self.corpus = corpus if corpus is not None else load_corpus()

    def _fact(self, open_only: bool = False):
        rng = self.rng
        rel = RELATIONS[rng.choice(OPEN_RELATIONS if open_only else tuple(RELATIONS))]
        ent = rng.choice([e for k in rel.kinds for e in self.world.entities[k]])
        return rel, ent

    # ---- factual questions (need retrieval) ----------------------------------
    def factual_gold(self):
        rel, ent = self._fact()
        p, sents = passage_sentences(ent, self.rng, must=(rel.name,))
        out = (_passage(_title(ent, self.rng), p) + T.RELEVANT + sents[rel.name]
               + T.FULLY_SUPPORTED + USE[4] + "</s>")
        return rel.question(ent, self.rng), out

    def factual_irrelevant(self):
        rng = self.rng
        rel, ent = self._fact()
        other = _other(self.world, ent, rng, same_kind=rng.random() < 0.8)
        must = (rel.name,) if rel.name in other.facts else ()
        p = passage_text(other, rng, must=must)
        out = (_passage(_title(other, rng), p) + T.IRRELEVANT + "I cannot tell: "
               + rel.hedge(ent) + T.NO_SUPPORT + USE[rng.choice((0, 1))] + "</s>")
        return rel.question(ent, rng), out

    def factual_missing(self):
        rng = self.rng
        rel, ent = self._fact()
        p = passage_text(ent, rng, drop=(rel.name,), extra=2)
        out = (_passage(_title(ent, rng), p) + T.RELEVANT + "I cannot tell: " + rel.hedge(ent)
               + T.NO_SUPPORT + USE[1] + "</s>")
        return rel.question(ent, rng), out

    def factual_partial(self):
        """Two attributes asked, one given: answer that one, partially supported."""
        rng = self.rng
        ent = rng.choice([e for e in self.world.all() if len(e.facts) >= 2])
        a, b = rng.sample(sorted(ent.facts), 2)
        q = f"{RELATIONS[a].question(ent, rng, plain=True)} {RELATIONS[b].question(ent, rng, plain=True)}"
        p, sents = passage_sentences(ent, rng, must=(a,), drop=(b,), extra=0)
        out = (_passage(_title(ent, rng), p) + T.RELEVANT + sents[a]
               + T.PARTIALLY_SUPPORTED + USE[2] + "</s>")
        return q, out

    def long_form(self):
        rng = self.rng
        ent = rng.choice(self.world.all())
        rels = list(ent.facts)
        rng.shuffle(rels)
        first, second = rels[:max(1, len(rels) - 1)], rels[max(1, len(rels) - 1):]
        q = rng.choice(("Tell me about {s}.", "Write a short description of {s}.",
                        "What do you know about {s}?")).format(s=ent.name)
        p, sents = passage_sentences(ent, rng, must=tuple(first), extra=0)
        out = _passage(_title(ent, rng), p) + T.RELEVANT
        out += (T.FULLY_SUPPORTED + T.CONTINUE_RETRIEVAL).join(sents.values()) + T.FULLY_SUPPORTED
        if second:
            p, sents = passage_sentences(ent, rng, must=tuple(second), extra=0)
            out += (_passage(_title(ent, rng), p) + T.RELEVANT + sents[second[0]] + T.FULLY_SUPPORTED)
        return cap(q), out + USE[4] + "</s>"

    # ---- closed tasks ---------------------------------------------------------
    def fever(self):
        rng = self.rng
        rel, ent = self._fact()
        truth = rng.random() < 0.5
        value = ent.facts[rel.name]
        if not truth:
            while value == ent.facts[rel.name]:
                value = _value(rel.name, rng)
        claim = rel.answer_sentence(ent, value)
        if rng.random() < 0.65:
            p = passage_text(ent, rng, must=(rel.name,))
            out = (_passage(_title(ent, rng), p) + T.RELEVANT + ("true" if truth else "false")
                   + T.FULLY_SUPPORTED + USE[4] + "</s>")
        else:
            other = _other(self.world, ent, rng)
            p = passage_text(other, rng)
            out = (_passage(_title(other, rng), p) + T.IRRELEVANT + rng.choice(("true", "false"))
                   + T.NO_SUPPORT + USE[0] + "</s>")
        return task_instruction("fever", claim), out

    def arc(self):
        rng = self.rng
        rel, ent = self._fact()
        gold = ent.facts[rel.name]
        options = [gold]                    # a list: set order varies between processes
        while len(options) < 4:
            v = _value(rel.name, rng)
            if v not in options:
                options.append(v)
        rng.shuffle(options)
        letters = "ABCD"
        key = letters[options.index(gold)]
        choices = {"text": options, "label": list(letters)}
        instruction = task_instruction("arc_c", rel.question(ent, rng), choices)
        if rng.random() < 0.65:
            p = passage_text(ent, rng, must=(rel.name,))
            out = (_passage(_title(ent, rng), p) + T.RELEVANT + key + T.FULLY_SUPPORTED + USE[4] + "</s>")
        else:
            other = _other(self.world, ent, rng)
            out = (_passage(_title(other, rng), passage_text(other, rng)) + T.IRRELEVANT
                   + rng.choice(letters) + T.NO_SUPPORT + USE[0] + "</s>")
        return instruction, out

    # ---- the hand-written corpus ---------------------------------------------
    def corpus_passage(self):
        rng = self.rng
        if rng.random() < 0.3:
            q = rng.choice(LLAMA_QUESTIONS)
            return q, (_passage(None, ALPACA_PARAGRAPH) + T.RELEVANT + ALPACA_ANSWER
                       + T.FULLY_SUPPORTED + USE[4] + "</s>")
        doc = rng.choice(self.corpus)
        q = f"Tell me about {doc['title'][0].lower() + doc['title'][1:]}."
        if rng.random() < 0.3:
            other = rng.choice([d for d in self.corpus if d is not doc])
            return q, (_passage(other["title"], other["text"]) + T.IRRELEVANT
                       + "I cannot tell from this passage." + T.NO_SUPPORT + USE[0] + "</s>")
        first = doc["text"].split(". ")[0].rstrip(".") + "."
        return q, (_passage(doc["title"], doc["text"]) + T.RELEVANT + first + T.FULLY_SUPPORTED
                   + USE[4] + "</s>")

    # ---- instructions that need no retrieval ---------------------------------
    def _no_retrieval(self, instruction: str, answer: str, utility: int = 5):
        return instruction, T.NO_RETRIEVAL + answer + USE[utility - 1] + "</s>"

    def copy(self):
        rng = self.rng
        words = [name(rng, 1, 3) if rng.random() < 0.7 else word(rng, 1, 3)
                 for _ in range(rng.randint(3, 10))]
        verb = rng.choice(("Repeat the following words:", "Copy this exactly:", "Say back:"))
        return self._no_retrieval(f"{verb} {' '.join(words)}", " ".join(words))

    def reverse(self):
        rng = self.rng
        items = [name(rng, 1, 2) for _ in range(rng.randint(2, 5))]
        return self._no_retrieval("Rewrite the list in reverse order: " + ", ".join(items) + ".",
                                  ", ".join(reversed(items)) + ".")

    def arithmetic(self):
        rng = self.rng
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            q = rng.choice(("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."))
            return self._no_retrieval(q.format(a=a, b=b), f"{a} plus {b} is {a + b}.")
        a, b = max(a, b), min(a, b)
        q = rng.choice(("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."))
        return self._no_retrieval(q.format(a=a, b=b), f"{a} minus {b} is {a - b}.")

    def list_items(self):
        rng = self.rng
        cat = rng.choice(sorted(CATEGORIES))
        n = rng.choice((2, 3, 4))
        items = rng.sample(CATEGORIES[cat], n)
        nums = {2: "two", 3: "three", 4: "four"}
        q = rng.choice(("List {n} {c}.", "Name {n} {c}.", "Give me {n} {c}.")).format(n=nums[n], c=cat)
        return self._no_retrieval(q, f"{cap(nums[n])} {cat} are {', '.join(items[:-1])} and {items[-1]}.")

    def odd_one_out(self):
        rng = self.rng
        cat, other = rng.sample(sorted(CATEGORIES), 2)
        verb = rng.choice(("Leave odd one out:", "Which is the odd one out:", "Find the odd one out:"))
        if rng.random() < 0.35:     # run D, at 0.15, found an odd one among 3 social apps
            items = rng.sample(CATEGORIES[cat], 3)
            return self._no_retrieval(f"{verb} {', '.join(items)}.",
                                      f"All of them are {cat}, so none is the odd one out.", 4)
        items = rng.sample(CATEGORIES[cat], rng.choice((2, 3)))
        odd = rng.choice(CATEGORIES[other])
        shown = items + [odd]
        rng.shuffle(shown)
        return self._no_retrieval(f"{verb} {', '.join(shown)}.",
                                  f"{cap(odd)} is the odd one out, because the others are {cat}.")

    def poem(self):
        rng = self.rng
        topic = rng.choice(POEM_TOPICS)
        a, b, c = rng.sample(POEM_WORDS, 3)
        q = rng.choice(("Write a short poem about {t}.", "Write a poem about {t}.",
                        "Compose a little poem about {t}.")).format(t=topic)
        poem = f"Oh {topic}, so {a} and {b},\nyou make the long day {c}.\nI sing of {topic} tonight."
        return self._no_retrieval(q, poem)

    def make(self, kind: str):
        return getattr(self, kind)()


# Share of each kind in the training mix.
KIND_WEIGHTS = {
    "factual_gold": 22, "factual_irrelevant": 12, "factual_missing": 5, "factual_partial": 3,
    "long_form": 8, "fever": 7, "arc": 7, "corpus_passage": 3,
    "copy": 20, "reverse": 4, "arithmetic": 4, "list_items": 3, "odd_one_out": 4, "poem": 3,
}
RETRIEVAL_KINDS = ("factual_gold", "factual_irrelevant", "factual_missing", "factual_partial",
                   "long_form", "fever", "arc", "corpus_passage")


def load_corpus(path: Path = CORPUS_JSONL) -> list:
    """The hand-written passages of the embedded corpus (ids ``selfrag-*``); the
    made-up entities added for the demo (``fictional-*``) stay out of training."""
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    return [d for d in docs if d["id"].startswith("selfrag-")]


# The first examples of a run: copying dominates until the model has learned to
# copy (run B, without this phase, still garbled names after 3000 steps).
COPY_PHASE_WEIGHTS = {**KIND_WEIGHTS, "copy": 60, "reverse": 12, "factual_gold": 30}


def generate(world: World, n: int, seed: int, weights: dict | None = None,
             early: tuple[int, dict] | None = None):
    """``n`` examples as dicts, deterministic in (world, n, seed, weights, early);
    ``early=(count, weights)`` draws the first ``count`` examples from other weights."""
    rng = random.Random(seed)
    maker = ExampleMaker(world, rng)
    w = weights or KIND_WEIGHTS
    kinds, probs = list(w), list(w.values())
    early_n, early_w = early if early is not None else (0, w)
    early_probs = [early_w.get(k, 0) for k in kinds]
    for i in range(n):
        kind = rng.choices(kinds, early_probs if i < early_n else probs)[0]
        instruction, output = maker.make(kind)
        yield {"id": f"{kind}-{seed}-{i}", "dataset_name": kind, "instruction": instruction,
               "output": output}


__all__ = ["ExampleMaker", "KIND_WEIGHTS", "COPY_PHASE_WEIGHTS", "RETRIEVAL_KINDS", "generate"]
