"""Retrievers: where Self-RAG's evidence passages come from.

Self-RAG itself never searches: it is handed up to ``k`` passages for a query
and judges them with its reflection tokens.  Anything with a
``retrieve(query, k) -> list[Passage]`` method (best first, every ``score``
set) is a :class:`Retriever`.  Two are provided:

* :class:`GivenPassages` — fixed passages per query, e.g. the ``ctxs`` shipped
  in the official evaluation files (that is how the paper's short-form numbers
  are produced: no live retrieval at all).
* :class:`BM25Retriever` — lexical BM25 (the ``bm25s`` package) over a JSONL
  corpus, one ``{"title": ..., "text": ..., "id"?: ...}`` object per line.
  The index is built once and cached on disk, keyed by a hash of the corpus
  bytes; later constructions load it instead of rebuilding.

:func:`default_retriever` is a BM25 retriever over the small embedded corpus
``selfrag/data/corpus.jsonl`` (hand-written passages on camelids, messaging
apps and social networks, retrieval, geography, science and history), so demos
work with no download.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from selfrag.types import Passage

DEFAULT_CORPUS = Path(__file__).with_name("data") / "corpus.jsonl"
# The Self-RAG SmolLM2's corpus: 263 short passages of real facts in our own words.
REALFACTS_CORPUS = Path(__file__).with_name("data") / "realfacts.jsonl"
CACHE_ENV = "SELFRAG_CACHE"
# Part of the cache key: bump it whenever tokenization or BM25 parameters change.
INDEX_FORMAT = "bm25s-v1:en_plus-stopwords:plural-stem:k1=1.5:b=0.75"
_DONE_MARKER = "selfrag-index.json"
_TOKEN_PATTERN = r"(?u)\b\w\w+\b"


@runtime_checkable
class Retriever(Protocol):
    """Anything that returns the ``k`` best passages for a query, best first, scores set."""

    def retrieve(self, query: str, k: int) -> list[Passage]:
        ...


class UnknownQueryError(KeyError):
    """A :class:`GivenPassages` lookup for a query it holds no passages for."""

    def __str__(self) -> str:  # KeyError would show repr(message), quotes and all
        return str(self.args[0]) if self.args else "unknown query"


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return k


def _check_query(query: str) -> str:
    if not isinstance(query, str):
        raise ValueError(f"query must be a str, got {type(query).__name__}")
    return query


def _with_rank_scores(passages: list[Passage]) -> list[Passage]:
    """Copies of ``passages`` (best first); a missing score becomes ``n - rank``."""
    n = len(passages)
    return [Passage(title=p.title, text=p.text,
                    score=float(n - i) if p.score is None else float(p.score))
            for i, p in enumerate(passages)]


def passages_from_record(record: Mapping, where: str = "record") -> list[Passage]:
    """The ``ctxs`` of one evaluation record as passages (best first, as stored)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    ctxs = record.get("ctxs")
    if not isinstance(ctxs, list):
        raise ValueError(f"{where}: 'ctxs' must be a list of passages, got {type(ctxs).__name__}")
    out = []
    for j, ctx in enumerate(ctxs):
        if not isinstance(ctx, Mapping):
            raise ValueError(f"{where}: ctxs[{j}] must be an object, got {type(ctx).__name__}")
        try:
            out.append(Passage.from_dict(ctx))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: ctxs[{j}] is not a passage: {e}") from e
    return out


class GivenPassages:
    """Pre-given passages per exact query string (e.g. an eval file's ``ctxs``).

    ``retrieve(query, k)`` returns the first ``k`` passages stored for
    ``query`` (fewer if fewer are stored); a query with no entry raises
    :class:`UnknownQueryError` (a ``KeyError``).  Passages without a score get
    ``n - rank`` so that the order is also the score order.
    """

    def __init__(self, passages_by_query: Mapping[str, Iterable[Passage]] | None = None):
        self._by_query: dict[str, list[Passage]] = {}
        for query, passages in (passages_by_query or {}).items():
            self.add(query, passages)

    def add(self, query: str, passages: Iterable[Passage]) -> None:
        """Store (or replace) the passages for ``query``, best first."""
        _check_query(query)
        passages = list(passages)
        for j, p in enumerate(passages):
            if not isinstance(p, Passage):
                raise ValueError(f"passages for {query!r}: item {j} is a "
                                 f"{type(p).__name__}, not a Passage")
        self._by_query[query] = _with_rank_scores(passages)

    @classmethod
    def from_eval_records(cls, records: Iterable[Mapping]) -> "GivenPassages":
        """Build from evaluation records, each with ``question`` and ``ctxs``.

        A question repeated with identical passages is fine; repeated with
        different passages it is ambiguous and raises ``ValueError`` (look such
        records up one by one with :func:`passages_from_record`).
        """
        given = cls()
        for i, record in enumerate(records):
            where = f"record {i}"
            question = record.get("question") if isinstance(record, Mapping) else None
            if not isinstance(question, str):
                raise ValueError(f"{where}: needs a str 'question' field, got {question!r}")
            passages = _with_rank_scores(passages_from_record(record, where))
            if question in given._by_query and given._by_query[question] != passages:
                raise ValueError(f"{where}: question {question!r} appears earlier with "
                                 f"different ctxs; a query-keyed lookup would be ambiguous")
            given._by_query[question] = passages
        return given

    def __len__(self) -> int:
        return len(self._by_query)

    def __contains__(self, query: object) -> bool:
        return query in self._by_query

    def retrieve(self, query: str, k: int) -> list[Passage]:
        _check_k(k)
        try:
            passages = self._by_query[_check_query(query)]
        except KeyError:
            raise UnknownQueryError(f"no passages were given for query {query!r} "
                                    f"({len(self._by_query)} queries known)") from None
        return [Passage(title=p.title, text=p.text, score=p.score) for p in passages[:k]]


# ---------------------------------------------------------------------------
# BM25


def plural_stem(words: list[str]) -> list[str]:
    """A deliberately tiny English stemmer: folds regular plurals onto the singular.

    ``llamas -> llama``, ``apps -> app``, ``berries -> berry``; words ending in
    ``ss``/``us``/``is`` and words of three letters or fewer are kept.  Applied
    to corpus and queries alike, so the rule need only be consistent.
    """
    out = []
    for w in words:
        if len(w) > 4 and w.endswith("ies"):
            w = w[:-3] + "y"
        elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
            w = w[:-1]
        out.append(w)
    return out


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stop words (bm25s' built-in list), plural-stemmed."""
    import bm25s
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    return bm25s.tokenize(texts, lower=True, token_pattern=_TOKEN_PATTERN,
                          stopwords=list(STOPWORDS_EN_PLUS), stemmer=plural_stem,
                          return_ids=False, show_progress=False)


def _quiet(fn) -> dict:
    """``show_progress=False`` when ``fn`` takes it (older bm25s releases' save/load do not)."""
    return {"show_progress": False} if "show_progress" in inspect.signature(fn).parameters else {}


def _build_index(token_lists: list[list[str]]):
    """A fresh ``bm25s.BM25`` index over tokenized documents (module-level so tests can watch it)."""
    import bm25s

    index = bm25s.BM25(k1=1.5, b=0.75)
    index.index(token_lists, show_progress=False)
    return index


def load_corpus(path: str | os.PathLike, data: bytes | None = None) -> list[dict]:
    """Parse a JSONL corpus into ``[{"title", "text", "id"}]``; errors name the file and line."""
    path = Path(path)
    if data is None:
        data = _read_corpus_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus {path} is not UTF-8: {e}") from e
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"corpus {path}, line {lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"corpus {path}, line {lineno}: expected a JSON object, "
                             f"got {type(obj).__name__}")
        for field in ("title", "text"):
            if not isinstance(obj.get(field), str):
                raise ValueError(f"corpus {path}, line {lineno}: field {field!r} must be a "
                                 f"string, got {obj.get(field)!r}")
        docs.append({"title": obj["title"], "text": obj["text"], "id": obj.get("id", len(docs))})
    if not docs:
        raise ValueError(f"corpus {path} holds no passages")
    return docs


def _read_corpus_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"corpus path is a directory, not a JSONL file: {path}") from None


def bm25_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/bm25`` where ``<cache>`` is the argument, ``$SELFRAG_CACHE`` or ``~/.cache/selfrag-engine``."""
    if cache_dir is not None:
        root = Path(cache_dir).expanduser()
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        root = Path.home() / ".cache" / "selfrag-engine"
    return root / "bm25"


class BM25Retriever:
    """BM25 over a JSONL corpus, its index cached on disk.

    The index lives in ``<cache>/bm25/<sha256 of INDEX_FORMAT + corpus bytes>``
    (see :func:`bm25_cache_root`): built on the first construction (into a
    temporary sibling directory renamed into place, so an interrupted build
    leaves nothing half-written), loaded on later ones.  ``built`` says which
    happened.  Scoring is bm25s' Lucene variant (k1=1.5, b=0.75).  Title and
    text are tokenized together (:func:`tokenize`).  Ties in score keep
    corpus order; documents sharing no term with the query score 0 and still
    fill the ``k`` slots.
    """

    def __init__(self, corpus_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        import bm25s

        self.corpus_path = Path(corpus_path)
        data = _read_corpus_bytes(self.corpus_path)
        self.docs = load_corpus(self.corpus_path, data)
        key = hashlib.sha256(INDEX_FORMAT.encode() + b"\0" + data).hexdigest()[:32]
        self.index_dir = bm25_cache_root(cache_dir) / key
        self.built = False
        if not (self.index_dir / _DONE_MARKER).is_file():
            self._build_into(self.index_dir)
            self.built = True
        self._index = bm25s.BM25.load(str(self.index_dir), **_quiet(bm25s.BM25.load))

    def _build_into(self, target: Path) -> None:
        index = _build_index(tokenize([f"{d['title']}\n{d['text']}" for d in self.docs]))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            index.save(str(tmp), **_quiet(index.save))
            (tmp / _DONE_MARKER).write_text(json.dumps(
                {"format": INDEX_FORMAT, "corpus": str(self.corpus_path),
                 "num_docs": len(self.docs)}), encoding="utf-8")
            if target.exists() and not (target / _DONE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)   # left over from an interrupted build
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / _DONE_MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.docs)

    def scores(self, query: str) -> list[float]:
        """The BM25 score of every document for ``query``, in corpus order."""
        tokens = tokenize([_check_query(query)])[0]
        if not tokens:
            return [0.0] * len(self.docs)
        return [float(s) for s in self._index.get_scores(tokens)]

    def retrieve(self, query: str, k: int) -> list[Passage]:
        _check_k(k)
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]  # stable: ties keep corpus order
        return [Passage(title=self.docs[i]["title"], text=self.docs[i]["text"], score=scores[i])
                for i in order]


def default_retriever(cache_dir: str | os.PathLike | None = None,
                      corpus: str | os.PathLike = DEFAULT_CORPUS) -> BM25Retriever:
    """BM25 over an embedded corpus: ``selfrag/data/corpus.jsonl`` (the miniature model's),
    or ``REALFACTS_CORPUS`` (the Self-RAG SmolLM2's)."""
    return BM25Retriever(corpus, cache_dir=cache_dir)
