"""A world of made-up entities whose facts can only be learned from passages.

Names are built from syllables, values come from open spaces (made-up names,
numbers), so a model trained on one ``World`` cannot guess the facts of
another: it has to read them from the passage in its prompt.  Everything is
drawn from a ``random.Random`` the caller seeds, so a seed fixes the world.

    world = World.build(random.Random(0), per_kind=200)
    ent = world.entities["country"][0]
    ent.facts["capital"]            # e.g. "Quelmar"
    RELATIONS["capital"].question(ent, rng)   # "Which city is the capital of Zorvia?"
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# A small syllable inventory (10 x 5 x 3 = 150 syllables), so that the tokenizer
# learns whole syllables (and common pairs) as pieces: a made-up name is then 2-3
# distinct pieces rather than 4-6 one- or two-letter ones ('Kelmi' was
# '_K el m i'), and copying it from a passage needs no guessing which of many
# 'i' or 'an' pieces came next.
ONSETS = ("b", "d", "k", "l", "m", "n", "p", "r", "s", "t")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "n", "r")
ANIMALS = ("fox", "beetle", "heron", "lizard", "deer", "owl", "frog", "moth", "goat", "crab")
FOODS = ("berries", "roots", "seeds", "leaves", "moss", "nuts", "snails", "grass")
INVENTIONS = ("engine", "lamp", "loom", "clock", "compass", "pump", "press", "telescope")
ORGS = ("Society", "Guild", "Company", "Academy", "Brotherhood", "Institute", "League")
TOWERS = ("Tower", "Spire", "Lighthouse", "Monument", "Column")
SPANS = ("Bridge", "Wall", "Canal", "Aqueduct", "Causeway")
FAMOUS = ("festival", "cheese", "pottery", "bells", "gardens", "horses", "wine", "markets",
          "carpets", "songs")
LANGUAGE_ENDINGS = ("ic", "ish", "ese", "an", "i")


def syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    """A lower-case made-up word of ``lo``..``hi`` syllables."""
    return "".join(syllable(rng) for _ in range(rng.randint(lo, hi)))


def name(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return word(rng, lo, hi).capitalize()


def person(rng: random.Random) -> str:
    return f"{name(rng, 2, 2)} {name(rng, 2, 3)}"


def cap(text: str) -> str:
    """Upper-case the first character (``the Velmar fox`` -> ``The Velmar fox``)."""
    return text[:1].upper() + text[1:]


@dataclass
class Entity:
    kind: str            # country, organisation, landmark, span, invention, town, species
    name: str            # how it is written mid-sentence ("the Velmar fox")
    title: str           # passage title ("Velmar fox")
    facts: dict = field(default_factory=dict)    # relation -> value (a string)


@dataclass(frozen=True)
class Relation:
    """One attribute: its question phrasings (plainest first), passage sentences,
    the plain answer sentence, and a hedge for when the passage lacks it."""

    name: str
    kinds: tuple
    questions: tuple
    passage: tuple
    answer: str
    missing: str           # "{s}" is the subject; says the attribute is not given
    closed: bool = False   # closed value space: excluded from the no-retrieval target

    def question(self, ent: Entity, rng: random.Random, plain: bool = False) -> str:
        q = self.questions[0] if plain else rng.choice(self.questions)
        return cap(q.format(s=ent.name))

    def sentence(self, ent: Entity, rng: random.Random, value: str | None = None) -> str:
        v = ent.facts[self.name] if value is None else value
        return cap(rng.choice(self.passage).format(s=ent.name, v=v))

    def answer_sentence(self, ent: Entity, value: str | None = None) -> str:
        v = ent.facts[self.name] if value is None else value
        return cap(self.answer.format(s=ent.name, v=v))

    def hedge(self, ent: Entity) -> str:
        return self.missing.format(s=ent.name)


def _r(name, kinds, questions, passage, answer, missing, closed=False) -> Relation:
    return Relation(name, tuple(kinds), tuple(questions), tuple(passage), answer, missing, closed)


RELATIONS: dict[str, Relation] = {r.name: r for r in (
    _r("capital", ["country"],
       ["What is the capital of {s}?", "Which city is the capital of {s}?",
        "Name the capital city of {s}.", "What city serves as the capital of {s}?"],
       ["The capital of {s} is {v}.", "{v} is the capital city of {s}.",
        "{s} is governed from its capital, {v}."],
       "The capital of {s} is {v}.", "the passage does not name the capital of {s}."),
    _r("language", ["country"],
       ["What language is spoken in {s}?", "Which language do people speak in {s}?",
        "What is the main language of {s}?"],
       ["The people of {s} speak {v}.", "{v} is the main language of {s}.",
        "In {s}, most people speak {v}."],
       "The language spoken in {s} is {v}.", "the passage does not say what language is spoken in {s}."),
    _r("founder", ["organisation"],
       ["Who founded {s}?", "Who was the founder of {s}?", "Who started {s}?"],
       ["{s} was founded by {v}.", "{v} founded {s}.", "The founder of {s} was {v}."],
       "{s} was founded by {v}.", "the passage does not say who founded {s}."),
    _r("founded", ["organisation"],
       ["When was {s} founded?", "In what year was {s} founded?", "What year was {s} established?"],
       ["{s} was founded in {v}.", "{s} was established in the year {v}.", "In {v}, {s} was founded."],
       "{s} was founded in {v}.", "the passage does not give the year {s} was founded."),
    _r("built", ["landmark", "span"],
       ["When was {s} built?", "In what year was {s} built?", "What year was {s} completed?"],
       ["{s} was built in {v}.", "Work on {s} was finished in {v}.", "In {v}, builders completed {s}."],
       "{s} was built in {v}.", "the passage does not say when {s} was built."),
    _r("location", ["landmark", "span"],
       ["Where is {s} located?", "Where can {s} be found?", "In which city is {s}?"],
       ["{s} is located in {v}.", "{s} stands in the city of {v}.", "Visitors find {s} in {v}."],
       "{s} is located in {v}.", "the passage does not say where {s} is."),
    _r("height", ["landmark"],
       ["How tall is {s}?", "What is the height of {s}?", "How high is {s}?"],
       ["{s} is {v} tall.", "{s} rises {v} above the ground.", "The height of {s} is {v}."],
       "{s} is {v} tall.", "the passage does not give the height of {s}."),
    _r("length", ["span"],
       ["How long is {s}?", "What is the length of {s}?", "How far does {s} stretch?"],
       ["{s} is {v} long.", "{s} stretches for {v}.", "The length of {s} is {v}."],
       "{s} is {v} long.", "the passage does not give the length of {s}."),
    _r("inventor", ["invention"],
       ["Who invented {s}?", "Who was the inventor of {s}?", "Who created {s}?"],
       ["{s} was invented by {v}.", "{v} invented {s}.", "The inventor of {s} was {v}."],
       "{s} was invented by {v}.", "the passage does not say who invented {s}."),
    _r("population", ["town"],
       ["What is the population of {s}?", "How many people live in {s}?",
        "How many inhabitants does {s} have?"],
       ["{s} has a population of {v}.", "About {v} people live in {s}.",
        "The town of {s} is home to {v} people."],
       "The population of {s} is {v}.", "the passage does not give the population of {s}."),
    _r("diet", ["species"],
       ["What does {s} eat?", "What is the diet of {s}?", "What food does {s} live on?"],
       ["{s} eats mostly {v}.", "{s} feeds on {v}.", "The diet of {s} consists of {v}."],
       "{s} eats {v}.", "the passage does not say what {s} eats."),
    _r("known_for", ["town"],
       ["What is {s} known for?", "What is {s} famous for?", "Why is {s} well known?"],
       ["{s} is known for {v}.", "{s} is famous for {v}.", "Travellers know {s} for {v}."],
       "{s} is known for {v}.", "the passage does not say what {s} is known for."),
    _r("used_for", ["invention"],
       ["What is {s} used for?", "What does {s} do?", "What was {s} made for?"],
       ["{s} is used for {v}.", "People use {s} for {v}.", "{s} was made for {v}."],
       "{s} is used for {v}.", "the passage does not say what {s} is used for."),
    # Closed value space (a colour): may be guessed, so never in the no-retrieval target.
    _r("colour", ["species"],
       ["What colour is {s}?", "Which colour does {s} have?", "What is the colour of {s}?"],
       ["{s} is {v} in colour.", "The fur or shell of {s} is {v}.", "Most of {s} is {v}."],
       "{s} is {v}.", "the passage does not give the colour of {s}.", closed=True),
)}
COLOURS = ("red", "brown", "grey", "black", "white", "yellow", "green", "blue")
OPEN_RELATIONS = tuple(r for r in RELATIONS if not RELATIONS[r].closed)
INTROS = {
    "country": "{s} is a small country.", "organisation": "{s} is an old organisation.",
    "landmark": "{s} is a famous landmark.", "span": "{s} is a long structure.",
    "invention": "{s} is a machine.", "town": "{s} is a town.", "species": "{s} is an animal.",
}


def _value(rel: str, rng: random.Random) -> str:
    if rel in ("capital", "location"):
        return name(rng)
    if rel == "language":
        return name(rng, 1, 2) + rng.choice(LANGUAGE_ENDINGS)
    if rel in ("founder", "inventor"):
        return person(rng)
    if rel in ("founded", "built"):
        return str(rng.randint(1100, 1990))
    if rel == "height":
        return f"{rng.randint(12, 480)} metres"
    if rel == "length":
        return (f"{rng.randint(20, 900)} metres" if rng.random() < 0.5
                else f"{rng.randint(2, 90)} kilometres")
    if rel == "population":
        return str(rng.randint(1200, 98000))
    if rel == "diet":
        return f"{word(rng, 1, 2)} {rng.choice(FOODS)}"
    if rel == "known_for":
        return f"its {word(rng, 1, 2)} {rng.choice(FAMOUS)}"
    if rel == "used_for":
        return f"{rng.choice(('grinding', 'measuring', 'weaving', 'lifting', 'drying'))} {word(rng, 1, 2)}"
    if rel == "colour":
        return rng.choice(COLOURS)
    raise KeyError(rel)


def _entity(kind: str, rng: random.Random) -> Entity:
    n = name(rng)
    if kind == "organisation":
        full = f"the {n} {rng.choice(ORGS)}"
    elif kind == "landmark":
        full = f"the {n} {rng.choice(TOWERS)}"
    elif kind == "span":
        full = f"the {n} {rng.choice(SPANS)}"
    elif kind == "invention":
        full = f"the {n} {rng.choice(INVENTIONS)}"
    elif kind == "species":
        full = f"the {n} {rng.choice(ANIMALS)}"
    else:
        full = n
    ent = Entity(kind, full, cap(full[4:] if full.startswith("the ") else full))
    for r in RELATIONS.values():
        if kind in r.kinds:
            ent.facts[r.name] = _value(r.name, rng)
    return ent


KINDS = ("country", "organisation", "landmark", "span", "invention", "town", "species")


@dataclass
class World:
    entities: dict            # kind -> list[Entity]

    @classmethod
    def build(cls, rng: random.Random, per_kind: int, avoid: set | None = None) -> "World":
        """``per_kind`` entities of each kind, no two sharing a head name, none in ``avoid``."""
        seen = set(avoid or ())
        ents: dict = {k: [] for k in KINDS}
        for kind in KINDS:
            while len(ents[kind]) < per_kind:
                e = _entity(kind, rng)
                head = head_name(e)
                if head in seen:
                    continue
                seen.add(head)
                ents[kind].append(e)
        return cls(ents)

    def all(self) -> list:
        return [e for k in KINDS for e in self.entities[k]]

    def names(self) -> set:
        return {head_name(e) for e in self.all()}


def head_name(ent: Entity) -> str:
    """The made-up word that identifies an entity ("Velmar" of "the Velmar fox")."""
    return ent.title.split()[0]


def passage_sentences(ent: Entity, rng: random.Random, must: tuple = (), drop: tuple = (),
                      extra: int | None = None) -> tuple[str, dict]:
    """2-4 sentences about ``ent``: every relation in ``must``, some others, none in
    ``drop``, in random order, sometimes after an intro sentence.  Returns the text
    and, per relation it states, its sentence (in passage order)."""
    rels = [r for r in ent.facts if r not in must and r not in drop]
    rng.shuffle(rels)
    n = rng.randint(0, min(2, len(rels))) if extra is None else min(extra, len(rels))
    chosen = list(must) + rels[:n]
    rng.shuffle(chosen)
    by_rel = {r: RELATIONS[r].sentence(ent, rng) for r in chosen}
    sents = list(by_rel.values())
    if rng.random() < 0.4 or not sents:
        sents.insert(0, cap(INTROS[ent.kind].format(s=ent.name)))
    return " ".join(sents), by_rel


def passage_text(ent: Entity, rng: random.Random, must: tuple = (), drop: tuple = (),
                 extra: int | None = None) -> str:
    return passage_sentences(ent, rng, must, drop, extra)[0]
