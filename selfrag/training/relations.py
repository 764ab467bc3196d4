"""Relations of the SmolLM2 Self-RAG data: questions, passage sentences, answers, claims.

Each relation has at least 12 question phrasings. The last ``HELDOUT_QUESTIONS`` of each
are never drawn for training, so the evaluation asks in ways training never did. Values
and entity names come from ``selfrag.training.names`` (wide, split by style), so a fact
can only be read from the passage, never guessed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from selfrag.training import names

HELDOUT_QUESTIONS = 2


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass
class Entity:
    kind: str
    name: str            # mid-sentence ("the Kovač Institute")
    title: str           # passage title ("Kovač Institute")
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Relation:
    name: str
    kind: str
    questions: tuple        # "{s}": the subject
    passage: tuple          # "{s}", "{v}"
    answers: tuple          # answer sentences
    missing: str            # the hedge when the passage lacks the fact

    def question(self, ent: Entity, rng: random.Random, split: str) -> str:
        pool = self.questions[:-HELDOUT_QUESTIONS] if split == "train" else self.questions[-HELDOUT_QUESTIONS:]
        return cap(rng.choice(pool).format(s=ent.name))

    def sentence(self, ent: Entity, rng: random.Random, value: str | None = None) -> str:
        return cap(rng.choice(self.passage).format(s=ent.name, v=ent.facts[self.name] if value is None else value))

    def answer(self, ent: Entity, rng: random.Random, value: str | None = None) -> str:
        return cap(rng.choice(self.answers).format(s=ent.name, v=ent.facts[self.name] if value is None else value))

    def hedge(self, ent: Entity) -> str:
        return self.missing.format(s=ent.name)


def _q(*qs):
    assert len(qs) >= 12, qs[0]
    return tuple(qs)


RELATIONS = {r.name: r for r in (
    Relation("capital", "country", _q(
        "What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital of {s}.",
        "What city serves as the capital of {s}?", "{s}'s capital is which city?", "Where is the capital of {s}?",
        "What is the capital city of {s}?", "Tell me the capital of {s}.", "Which city is {s} governed from?",
        "In which city does the government of {s} sit?", "Do you know what the capital of {s} is?",
        "The seat of government of {s} is which city?"),
        ("The capital of {s} is {v}.", "{v} is the capital city of {s}.", "{s} is governed from its capital, {v}.",
         "{s} has its capital and largest city at {v}.", "The government of {s} sits in {v}."),
        ("The capital of {s} is {v}.", "{v} is the capital of {s}.", "{v}."),
        "the passage does not name the capital of {s}."),
    Relation("language", "country", _q(
        "What language is spoken in {s}?", "Which language do people speak in {s}?",
        "What is the main language of {s}?", "What is the official language of {s}?",
        "What do people in {s} speak?", "Which language is used in {s}?", "Name the language of {s}.",
        "In what language do the people of {s} talk?", "What tongue is spoken in {s}?",
        "Tell me which language is spoken in {s}.", "What language would you hear in {s}?",
        "The people of {s} mostly speak which language?"),
        ("The people of {s} speak {v}.", "{v} is the official language of {s}.",
         "In {s}, most people speak {v}.", "The main language of {s} is {v}."),
        ("The language of {s} is {v}.", "People in {s} speak {v}.", "{v}."),
        "the passage does not say what language is spoken in {s}."),
    Relation("currency", "country", _q(
        "What is the currency of {s}?", "Which currency is used in {s}?", "What money do people use in {s}?",
        "Name the currency of {s}.", "What is the official currency of {s}?", "What do people pay with in {s}?",
        "Which currency does {s} use?", "What is the money of {s} called?", "Tell me the currency of {s}.",
        "In {s}, prices are given in which currency?", "What currency would I need in {s}?",
        "What is the name of the currency of {s}?"),
        ("The currency of {s} is {v}.", "{s} uses {v} as its currency.", "Prices in {s} are given in {v}."),
        ("The currency of {s} is {v}.", "{s} uses {v}.", "{v}."),
        "the passage does not name the currency of {s}."),
    Relation("river", "city", _q(
        "Which river flows through {s}?", "What river runs through {s}?", "On which river does {s} lie?",
        "Name the river of {s}.", "What is the river that crosses {s}?", "Which river is {s} built on?",
        "What river passes through the city of {s}?", "Tell me which river flows through {s}.",
        "{s} stands on the banks of which river?", "The city of {s} lies on which river?",
        "Do you know which river runs through {s}?", "By which river was {s} built?"),
        ("{v} flows through {s}.", "{s} lies on the banks of {v}.", "The city of {s} was built along {v}.",
         "{v} runs through the middle of {s}."),
        ("{v} flows through {s}.", "{s} lies on {v}.", "{v}."),
        "the passage does not say which river flows through {s}."),
    Relation("founded", "city", _q(
        "When was {s} founded?", "In what year was {s} founded?", "What year was {s} established?",
        "When was the city of {s} founded?", "In which year did {s} begin?", "How old is {s}: when was it founded?",
        "What is the founding year of {s}?", "Tell me when {s} was founded.", "When did settlers found {s}?",
        "Give the year {s} was founded.", "{s} dates from which year?", "Since which year has {s} existed?"),
        ("{s} was founded in {v}.", "Settlers founded {s} in {v}.", "The city of {s} dates from {v}.",
         "In {v}, the town of {s} was founded."),
        ("{s} was founded in {v}.", "It was founded in {v}.", "{v}."),
        "the passage does not give the year {s} was founded."),
    Relation("birthplace", "person", _q(
        "Where was {s} born?", "In which city was {s} born?", "What is the birthplace of {s}?",
        "Where did {s} come from?", "Which town was {s} born in?", "Name the birthplace of {s}.",
        "Where is {s} from?", "Tell me where {s} was born.", "What city was {s} born in?",
        "In what place was {s} born?", "{s} was born in which city?", "Do you know where {s} was born?"),
        ("{s} was born in {v}.", "Born in {v}, {s} grew up there.", "{s} came from the city of {v}.",
         "{s}'s birthplace was {v}."),
        ("{s} was born in {v}.", "{s} came from {v}.", "{v}."),
        "the passage does not say where {s} was born."),
    Relation("work", "person", _q(
        "What book did {s} write?", "Which book was written by {s}?", "Name a book by {s}.",
        "What is {s} best known for writing?", "Which novel did {s} write?", "What did {s} write?",
        "What is the most famous book of {s}?", "Tell me a work written by {s}.",
        "Who is {s}, and what did they write?",
        "Which work made {s} famous?", "{s} is the author of which book?", "What book is {s} remembered for?"),
        ("{s} wrote {v}.", "{v} was written by {s}.", "{s} is best known for the book {v}.",
         "The novel {v} made {s} famous."),
        ("{s} wrote {v}.", "{s} is the author of {v}.", "{v}."),
        "the passage does not say what {s} wrote."),
    Relation("inventor", "invention", _q(
        "Who invented {s}?", "Who was the inventor of {s}?", "Who created {s}?", "Who designed {s}?",
        "Who came up with {s}?", "Name the inventor of {s}.", "Who built the first model of {s}?",
        "Tell me who invented {s}.", "Who is credited with inventing {s}?", "Which person invented {s}?",
        "{s} was invented by whom?", "Do you know who invented {s}?"),
        ("{s} was invented by {v}.", "{v} invented {s}.", "The inventor of {s} was {v}.",
         "{v} built the first working model of {s}."),
        ("{s} was invented by {v}.", "{v} invented {s}.", "{v}."),
        "the passage does not say who invented {s}."),
    Relation("invented", "invention", _q(
        "When was {s} invented?", "In what year was {s} invented?", "What year did {s} first appear?",
        "When was {s} first built?", "In which year was {s} created?", "When did {s} come into use?",
        "How long ago was {s} invented: in what year?", "Tell me when {s} was invented.",
        "What is the year of invention of {s}?", "Give the year {s} was invented.",
        "{s} was invented in which year?", "Since when has {s} existed?"),
        ("{s} was invented in {v}.", "{s} first appeared in {v}.", "In {v}, {s} was first built."),
        ("{s} was invented in {v}.", "It was invented in {v}.", "{v}."),
        "the passage does not say when {s} was invented."),
    Relation("founder", "organisation", _q(
        "Who founded {s}?", "Who was the founder of {s}?", "Who started {s}?", "Who set up {s}?",
        "Name the founder of {s}.", "Who established {s}?", "Which person founded {s}?",
        "Tell me who founded {s}.", "Who created {s}?", "By whom was {s} founded?",
        "{s} was founded by whom?", "Who is the founder of {s}?"),
        ("{s} was founded by {v}.", "{v} founded {s}.", "The founder of {s} was {v}.",
         "{v} set up {s} with a few friends."),
        ("{s} was founded by {v}.", "{v} founded {s}.", "{v}."),
        "the passage does not say who founded {s}."),
    Relation("headquarters", "organisation", _q(
        "Where is {s} based?", "Where are the headquarters of {s}?", "In which city is {s} based?",
        "Where does {s} have its head office?", "What city is {s} headquartered in?",
        "Name the city where {s} is based.", "Where is the main office of {s}?", "Tell me where {s} is based.",
        "Where is {s} located?", "In what city are the offices of {s}?", "{s} is based in which city?",
        "From which city is {s} run?"),
        ("{s} is based in {v}.", "The headquarters of {s} are in {v}.", "{s} has its head office in {v}.",
         "{s} is run from offices in {v}."),
        ("{s} is based in {v}.", "Its headquarters are in {v}.", "{v}."),
        "the passage does not say where {s} is based."),
    Relation("diet", "species", _q(
        "What does {s} eat?", "What is the diet of {s}?", "What food does {s} live on?",
        "What do {s}s eat?", "What does {s} feed on?", "Name the main food of {s}.", "What is {s}'s food?",
        "Tell me what {s} eats.", "What is the favourite food of {s}?", "On what does {s} feed?",
        "{s} mostly eats what?", "Do you know what {s} eats?"),
        ("{s} eats mostly {v}.", "{s} feeds on {v}.", "The diet of {s} consists of {v}.",
         "In the wild, {s} lives on {v}."),
        ("{s} eats {v}.", "{s} feeds on {v}.", "{v}."),
        "the passage does not say what {s} eats."),
    Relation("habitat", "species", _q(
        "Where does {s} live?", "What is the habitat of {s}?", "Where is {s} found?",
        "In what kind of place does {s} live?", "Where can {s} be found in the wild?", "Name the habitat of {s}.",
        "Where does {s} make its home?", "Tell me where {s} lives.", "What region is home to {s}?",
        "Where do {s}s live?", "{s} lives where?", "In which habitat is {s} found?"),
        ("{s} lives in {v}.", "{s} is found in {v}.", "The home of {s} is {v}.",
         "{s} makes its home in {v}."),
        ("{s} lives in {v}.", "{s} is found in {v}.", "{v}."),
        "the passage does not say where {s} lives."),
    Relation("location", "landmark", _q(
        "Where is {s}?", "Where is {s} located?", "In which city is {s}?", "Where can I see {s}?",
        "In what city does {s} stand?", "Name the city where {s} stands.", "Where would I find {s}?",
        "Tell me where {s} is.", "What town is {s} in?", "Where was {s} built?",
        "{s} is in which city?", "In which place can {s} be visited?"),
        ("{s} stands in {v}.", "{s} is located in {v}.", "Visitors find {s} in the city of {v}.",
         "{s} was built in {v}."),
        ("{s} is in {v}.", "{s} stands in {v}.", "{v}."),
        "the passage does not say where {s} is."),
    Relation("height", "landmark", _q(
        "How tall is {s}?", "What is the height of {s}?", "How high is {s}?", "How many metres tall is {s}?",
        "What height does {s} reach?", "Tell me the height of {s}.", "How tall was {s} built?",
        "Give the height of {s}.", "How high does {s} rise?", "What is the total height of {s}?",
        "{s} is how tall?", "Do you know how tall {s} is?"),
        ("{s} is {v} tall.", "{s} rises {v} above the ground.", "The height of {s} is {v}."),
        ("{s} is {v} tall.", "It is {v} tall.", "{v}."),
        "the passage does not give the height of {s}."),
)}

KINDS = ("country", "city", "person", "invention", "organisation", "species", "landmark")
KIND_RELATIONS = {k: tuple(r for r in RELATIONS.values() if r.kind == k) for k in KINDS}
INTROS = {
    "country": ("{s} is a country.", "{s} is a small country with a long history.",
                "{s} is a nation of hills and valleys.", "{s} is a coastal country."),
    "city": ("{s} is a city.", "{s} is an old market town.", "{s} is a busy port city.",
             "{s} is a city known for its bridges."),
    "person": ("{s} was a writer.", "{s} was a novelist and teacher.", "{s} was a poet and essayist.",
               "{s} was an author of stories."),
    "invention": ("{s} is a machine.", "{s} is an early device.", "{s} is a tool that changed daily work.",
                  "{s} is a small mechanical device."),
    "organisation": ("{s} is an organisation.", "{s} is a learned society.", "{s} is a trading company.",
                     "{s} is a charity."),
    "species": ("{s} is an animal.", "{s} is a small animal.", "{s} is a shy animal.",
                "{s} is a species rarely seen by people."),
    "landmark": ("{s} is a landmark.", "{s} is a famous tower.", "{s} is an old monument.",
                 "{s} is a tall structure that visitors climb."),
}
# Sentences about nothing in particular, to pad passages with text that answers nothing.
FILLERS = ("It attracts many visitors every year.", "Several books have been written about it.",
           "Its history is described in local records.", "It appears on many postcards.",
           "Scholars still debate parts of its early history.", "The area around it is quiet in winter.",
           "Local guides tell many stories about it.", "A small museum describes its past.")
ANIMALS = ("fox", "beetle", "heron", "lizard", "deer", "owl", "frog", "moth", "goat", "crab", "bat", "finch",
           "toad", "otter", "snake", "hare", "shrew", "gecko", "ibis", "weasel")
DEVICES = ("engine", "lamp", "loom", "clock", "compass", "pump", "press", "telescope", "scale", "kiln", "drill",
           "camera", "radio", "valve", "pen")
ORGS = ("Society", "Guild", "Company", "Academy", "Institute", "League", "Foundation", "Trust", "Union", "Club")
MONUMENTS = ("Tower", "Spire", "Lighthouse", "Monument", "Column", "Gate", "Arch", "Pagoda", "Obelisk")
UNITS = ("dinar", "crown", "mark", "peso", "shilling", "franc", "rupee", "florin", "lira", "dollar")
FOODS = ("berries", "roots", "seeds", "leaves", "moss", "nuts", "snails", "grass", "insects", "fish", "worms",
         "fruit", "bark", "mushrooms", "small crabs", "algae", "lichen", "beetles", "flowers", "eggs")
HABITATS = ("dry forests", "mountain streams", "salt marshes", "rocky coasts", "cold deserts", "river islands",
            "bamboo forests", "high meadows", "mangrove swamps", "cave systems", "open grasslands", "lake shores")
BOOK_SHAPES = ("The {w} of {p}", "{w}", "A Song for {p}", "Letters from {p}", "The Last {w}", "{w} and {w2}",
               "Winter in {p}", "The House of {w}")


def _value(rel: str, rng: random.Random, split: str) -> str:
    if rel in ("capital", "birthplace", "headquarters", "location"):
        return names.place(rng, split)
    if rel == "language":
        return names.word(rng.choice(names.styles(split)), rng) + rng.choice(("ic", "ish", "ese", "an", "i", "ian"))
    if rel == "currency":
        return f"the {names.word(rng.choice(names.styles(split)), rng)} {rng.choice(UNITS)}"
    if rel == "river":
        return f"the {names.place(rng, split)} River"
    if rel in ("founded", "invented"):
        return str(rng.randint(900, 2015))
    if rel in ("inventor", "founder"):
        return names.person(rng, split)
    if rel == "work":
        w = lambda: names.word(rng.choice(names.styles(split)), rng)  # noqa: E731
        return rng.choice(BOOK_SHAPES).format(w=w(), w2=w(), p=names.place(rng, split))
    if rel == "diet":
        a, b = rng.sample(FOODS, 2)
        return rng.choice((a, f"{a} and {b}"))
    if rel == "habitat":
        return f"the {rng.choice(HABITATS)} of {names.place(rng, split)}"
    if rel == "height":
        return f"{rng.randint(12, 640)} metres"
    raise KeyError(rel)


def entity(kind: str, rng: random.Random, split: str) -> Entity:
    if kind in ("country", "city"):
        n = names.place(rng, split)
        ent = Entity(kind, n, n)
    elif kind == "person":
        n = names.person(rng, split)
        ent = Entity(kind, n, n)
    else:
        w = names.place(rng, split)
        noun = {"invention": DEVICES, "organisation": ORGS, "species": ANIMALS, "landmark": MONUMENTS}[kind]
        title = f"{w} {rng.choice(noun)}"
        ent = Entity(kind, f"the {title}", title)
    for rel in KIND_RELATIONS[kind]:
        ent.facts[rel.name] = _value(rel.name, rng, split)
    return ent


def passage(ent: Entity, rng: random.Random, split: str, must: tuple = (), drop: tuple = (),
            distractors: int | None = None) -> tuple[str, dict]:
    """(text, {relation: its sentence}): an intro, the entity's facts (``must`` always,
    ``drop`` never, others by chance), fillers, and distractor sentences: the same
    relations stated about other entities of the kind, so the subject must be matched."""
    sents = {}
    for rel in KIND_RELATIONS[ent.kind]:
        if rel.name in drop:
            continue
        if rel.name in must or rng.random() < 0.6:
            sents[rel.name] = rel.sentence(ent, rng)
    body = list(sents.values())
    n_distract = rng.choice((0, 1, 1, 2)) if distractors is None else distractors
    for _ in range(n_distract):
        other = entity(ent.kind, rng, split)
        rel = rng.choice(KIND_RELATIONS[ent.kind])
        body.append(rel.sentence(other, rng))
    if rng.random() < 0.4:
        body.append(rng.choice(FILLERS))
    rng.shuffle(body)
    intro = cap(rng.choice(INTROS[ent.kind]).format(s=ent.name))
    return " ".join([intro, *body]), sents


# ---- reading back: what a question asks and what a passage states --------------------------
# (For evaluations: they find the gold value in a passage by reading its sentences, not by
# asking the generator what it wrote.)

def _template_regex(template: str) -> re.Pattern:
    body = re.escape(cap(template))
    body = body.replace(re.escape("{s}"), "(?P<s>.+?)").replace(re.escape("{v}"), "(?P<v>.+?)")
    return re.compile("^" + body + "$", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    """``text`` split after each sentence's end, not after an initial ("G. H. Hardy")."""
    out: list[str] = []
    for part in re.split(r"(?<=[.!?]) ", text):
        if out and re.search(r"(?:^|\s)[A-Z]\.$", out[-1]):
            out[-1] += " " + part
        else:
            out.append(part)
    return out


def parse_question(question: str) -> list[tuple[str, str]]:
    """The (relation, lower-cased subject) pairs ``question`` may ask: every phrasing it
    matches ("Who created {s}?" is both an inventor's and a founder's question)."""
    return [(rel.name, m["s"].lower()) for rel in RELATIONS.values() for t in rel.questions
            if (m := _template_regex(t).match(question))]


def statements(text: str, relation: str) -> set[tuple[str, str]]:
    """(lower-cased subject, value) pairs that ``text``'s sentences state in one of
    ``relation``'s passage templates."""
    return {(m["s"].lower(), m["v"]) for sentence in split_sentences(text)
            for t in RELATIONS[relation].passage if (m := _template_regex(t).match(sentence))}


def stated_answer(question: str, text: str) -> list[str]:
    """The values ``text`` states for what ``question`` asks about its subject."""
    return [v for rel, subject in parse_question(question) for s, v in statements(text, rel) if s == subject]
