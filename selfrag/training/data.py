"""Training data: the world split, the tokenizer corpus, and token ids with loss masks.

``training_world(seed)`` and ``heldout_world(seed)`` never share a head name,
so the held-out evaluation asks about entities the model has never seen.
``encode_example`` gives ``(ids, labels)`` with ``labels == -100`` on the
prompt and on every passage's text and ``</paragraph>``, as in the paper: the
model learns to ask for, judge and use passages, never to write them. The
``<paragraph>`` that opens a passage stays in the loss, so that a model asked
to generate freely follows ``[Retrieval]`` with it (run D, which masked it,
wrote ``[Retrieval][Partially supported]`` on the model card's second prompt).
"""

from __future__ import annotations

import hashlib
import json
import random

from selfrag import tokens as T
from selfrag.constraints import ReflectionConstraint, State
from selfrag.prompts import format_prompt
from selfrag.training.world import World

IGNORE = -100
TRAIN_ENTITIES_PER_KIND = 1500
HELDOUT_ENTITIES_PER_KIND = 120


def training_world(seed: int, per_kind: int = TRAIN_ENTITIES_PER_KIND) -> World:
    return World.build(random.Random(f"train-{seed}"), per_kind)


def heldout_world(seed: int, per_kind: int = HELDOUT_ENTITIES_PER_KIND,
                  train_per_kind: int = TRAIN_ENTITIES_PER_KIND) -> World:
    """Entities whose head names never occur in ``training_world(seed)``."""
    avoid = training_world(seed, train_per_kind).names()
    return World.build(random.Random(f"heldout-{seed}"), per_kind, avoid=avoid)


def full_text(example: dict) -> str:
    return format_prompt(example["instruction"]) + example["output"]


def plain_text(example: dict) -> str:
    """The example without added tokens (for training the sentencepiece model)."""
    text = full_text(example)
    for tok in T.ADDED_TOKENS:
        text = text.replace(tok, "\n")
    return text.replace("</s>", "")


def encode_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(input ids with BOS, labels): the prompt and each passage after its
    ``<paragraph>`` (``</paragraph>`` included) are ``IGNORE``."""
    prompt_ids = tokenizer.encode(format_prompt(example["instruction"]))
    ids = tokenizer.encode(full_text(example))
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"example {example['id']}: the prompt does not tokenize as a prefix")
    open_id = tokenizer.convert_tokens_to_ids(T.PARAGRAPH_START)
    close_id = tokenizer.convert_tokens_to_ids(T.PARAGRAPH_END)
    labels = list(ids)
    inside = False
    for i, t in enumerate(ids):
        if i < len(prompt_ids):
            labels[i] = IGNORE
            continue
        if inside:
            labels[i] = IGNORE
        if t == open_id:
            inside = True
        if t == close_id:
            inside = False
    return ids, labels


def grammar_violation(constraint: ReflectionConstraint, output_ids: list[int]) -> str | None:
    """None if the reflection grammar accepts ``output_ids`` as a whole response
    (from START to ``</s>``), else where it fails."""
    state = State.START
    for i, t in enumerate(output_ids):
        if not bool(constraint.allowed(state)[t]):
            return f"token {i} (id {t}) is masked in state {state.name}"
        state = constraint.next_state(state, t)
    if state != State.DONE:
        return f"ends in state {state.name}, not DONE"
    return None


def example_bytes(example: dict) -> bytes:
    """One example's canonical JSON line: what the data hashes are taken over."""
    return json.dumps(example, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"


def data_hash(examples) -> str:
    """sha256 over the examples' canonical JSON lines, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(example_bytes(ex))
    return h.hexdigest()
