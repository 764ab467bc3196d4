"""Plain data types of the Self-RAG layer: passages, critique scores, candidates, results.

Every type has ``to_dict()`` giving JSON-serialisable plain data (``json.dumps``
works on it as is): floats stay floats, NaN and +/-inf become ``None``, numpy
scalars become Python numbers.  ``from_dict`` reads that layout back (and, for
``Passage``, the ``ctxs`` entries of the released evaluation files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Mapping


def json_float(x: Any) -> float | None:
    """A float for JSON: NaN/inf -> None, numpy scalars -> float."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def plain(obj: Any) -> Any:
    """Recursively turn ``obj`` into JSON-serialisable plain data.

    Objects with ``to_dict`` use it; other dataclasses become dicts of their
    fields; mappings get string keys; tuples/lists become lists; numpy scalars
    and arrays are unwrapped (``.item()`` / ``.tolist()``).
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return json_float(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "tolist"):          # numpy arrays / torch tensors
        return plain(obj.tolist())
    if hasattr(obj, "item"):            # numpy scalars
        return plain(obj.item())
    raise ValueError(f"cannot convert {type(obj).__name__} to JSON data: {obj!r}")


def _float_or_nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


@dataclass
class Passage:
    """One retrieved passage; ``score`` is the retriever's score when known."""

    title: str
    text: str
    score: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> "Passage":
        """Read a ``ctxs`` entry of the eval files: ``title``, ``text``, optional ``score``.

        ``score`` may be a number or a numeric string ("1.23"); ``None`` or ""
        means unknown.  A missing/None ``title`` reads as "".  Extra keys (ids,
        ``hasanswer``...) are ignored.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a passage must be a dict with 'title' and 'text', got {type(d).__name__}")
        if not isinstance(d.get("text"), str):
            raise ValueError(f"passage dict needs a string 'text', got keys {sorted(d)}")
        title = d.get("title")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise ValueError(f"passage 'title' must be a string, got {title!r}")
        return cls(title=title, text=d["text"], score=_parse_score(d.get("score")))

    def to_dict(self) -> dict:
        return {"title": self.title, "text": self.text, "score": json_float(self.score)}


def _parse_score(raw: Any) -> float | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, bool):
        raise ValueError(f"passage 'score' must be a number, got {raw!r}")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"passage 'score' must be a number or numeric string, got {raw!r}") from None


@dataclass
class Scores:
    """Critique scores of one candidate (see ``selfrag.scoring``)."""

    rel: float
    sup: float
    use: float
    seq: float
    final: float

    def to_dict(self) -> dict:
        return {f.name: json_float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Scores":
        """Inverse of ``to_dict`` (``None`` reads back as NaN)."""
        return cls(**{f.name: _float_or_nan(d[f.name]) for f in fields(cls)})


@dataclass
class Candidate:
    """One generation: the passage it was conditioned on (None: no retrieval)."""

    passage: Passage | None
    text: str
    token_ids: list[int]
    scores: Scores

    def to_dict(self) -> dict:
        return {
            "passage": None if self.passage is None else self.passage.to_dict(),
            "text": self.text,
            "token_ids": [int(t) for t in self.token_ids],
            "scores": self.scores.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Candidate":
        p = d.get("passage")
        return cls(passage=None if p is None else Passage.from_dict(p), text=d["text"],
                   token_ids=[int(t) for t in d["token_ids"]], scores=Scores.from_dict(d["scores"]))


@dataclass
class Result:
    """The answer for one query plus everything that led to it.

    retrieval_prob: the adaptive rule's value (None when the mode did not ask).
    tree: long-form search tree, any nesting of plain data/dataclasses, or None.
    error: None, or why this query failed (its retriever raised, or one of its engine
        requests failed); ``answer`` is then "" and the batch's other results are whole.
    """

    answer: str
    retrieved: bool
    retrieval_prob: float | None
    candidates: list[Candidate] = field(default_factory=list)
    tree: list | None = None
    error: str | None = None         # why this query failed (its retrieval or generation)

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "retrieved": bool(self.retrieved),
            "retrieval_prob": json_float(self.retrieval_prob),
            "candidates": [c.to_dict() for c in self.candidates],
            "tree": plain(self.tree),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Result":
        """Inverse of ``to_dict``; ``tree`` stays plain data."""
        return cls(answer=d["answer"], retrieved=bool(d["retrieved"]), retrieval_prob=d.get("retrieval_prob"),
                   candidates=[Candidate.from_dict(c) for c in d.get("candidates", [])], tree=d.get("tree"),
                   error=d.get("error"))
