"""Retrievers: given passages, BM25 over a JSONL corpus (ranking, cache, errors), the default corpus."""

import json
import math

import pytest

from selfrag import retrievers
from selfrag.retrievers import (
    DEFAULT_CORPUS,
    BM25Retriever,
    GivenPassages,
    Retriever,
    UnknownQueryError,
    default_retriever,
    load_corpus,
    passages_from_record,
    plural_stem,
)
from selfrag.types import Passage


def write_corpus(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


TINY = [
    {"title": "Zebra", "text": "zebra stripes savanna", "id": "z"},
    {"title": "Kettle", "text": "kettle boils water"},
    {"title": "Violin", "text": "violin strings music concert"},
]


# ---------------------------------------------------------------------------
# GivenPassages

def test_given_passages_returns_first_k_with_rank_scores():
    ps = [Passage("A", "a"), Passage("B", "b"), Passage("C", "c")]
    given = GivenPassages({"q": ps})
    got = given.retrieve("q", 2)
    assert [(p.title, p.score) for p in got] == [("A", 3.0), ("B", 2.0)]
    assert [p.title for p in given.retrieve("q", 10)] == ["A", "B", "C"]
    assert "q" in given and len(given) == 1


def test_given_passages_keeps_given_scores_and_returns_copies():
    given = GivenPassages({"q": [Passage("A", "a", 7.5), Passage("B", "b")]})
    got = given.retrieve("q", 2)
    assert [p.score for p in got] == [7.5, 1.0]
    got[0].title = "mutated"
    got.append(Passage("X", "x"))
    assert [p.title for p in given.retrieve("q", 5)] == ["A", "B"]


def test_given_passages_unknown_query_is_a_clear_key_error():
    given = GivenPassages({"known": [Passage("A", "a")]})
    with pytest.raises(UnknownQueryError) as ei:
        given.retrieve("who?", 1)
    assert isinstance(ei.value, KeyError)
    assert str(ei.value).startswith("no passages were given for query 'who?'")
    with pytest.raises(KeyError):
        GivenPassages().retrieve("anything", 3)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_bad_k_is_a_value_error(k, tmp_path):
    with pytest.raises(ValueError, match="k must be a positive int"):
        GivenPassages({"q": [Passage("A", "a")]}).retrieve("q", k)
    bm25 = BM25Retriever(write_corpus(tmp_path / "c.jsonl", TINY), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="k must be a positive int"):
        bm25.retrieve("zebra", k)


def test_given_passages_rejects_non_passages():
    with pytest.raises(ValueError, match="item 1 is a dict"):
        GivenPassages({"q": [Passage("A", "a"), {"title": "B", "text": "b"}]})


def test_from_eval_records():
    records = [
        {"question": "Q1", "answers": ["x"],
         "ctxs": [{"title": "T1", "text": "one", "score": "1.5", "id": "9"}, {"title": None, "text": "two"}]},
        {"question": "Q2", "answers": ["y"], "ctxs": []},
        {"question": "Q1", "answers": ["x"],      # an identical repeat is fine
         "ctxs": [{"title": "T1", "text": "one", "score": "1.5", "id": "9"}, {"title": None, "text": "two"}]},
    ]
    given = GivenPassages.from_eval_records(records)
    assert given.retrieve("Q1", 5) == [Passage("T1", "one", 1.5), Passage("", "two", 1.0)]
    assert given.retrieve("Q2", 5) == []
    assert len(given) == 2


def test_from_eval_records_errors():
    with pytest.raises(ValueError, match="record 1: needs a str 'question'"):
        GivenPassages.from_eval_records([{"question": "a", "ctxs": []}, {"ctxs": []}])
    with pytest.raises(ValueError, match="record 0: 'ctxs' must be a list"):
        GivenPassages.from_eval_records([{"question": "a"}])
    with pytest.raises(ValueError, match=r"record 0: ctxs\[1\] is not a passage"):
        GivenPassages.from_eval_records([{"question": "a", "ctxs": [{"text": "ok"}, {"title": "no text"}]}])
    with pytest.raises(ValueError, match="record 1: question 'a' appears earlier with different ctxs"):
        GivenPassages.from_eval_records([{"question": "a", "ctxs": [{"text": "one"}]},
                                         {"question": "a", "ctxs": [{"text": "two"}]}])
    assert passages_from_record({"ctxs": [{"title": "t", "text": "x"}]}) == [Passage("t", "x")]


@pytest.mark.needs_bm25
def test_both_retrievers_satisfy_the_protocol(tmp_path):
    assert isinstance(GivenPassages(), Retriever)
    assert isinstance(BM25Retriever(write_corpus(tmp_path / "c.jsonl", TINY), cache_dir=tmp_path), Retriever)


# ---------------------------------------------------------------------------
# BM25

def test_plural_stem():
    assert plural_stem(["llamas", "apps", "berries", "glass", "virus", "analysis", "gas", "alpaca"]) == \
        ["llama", "app", "berry", "glass", "virus", "analysis", "gas", "alpaca"]


@pytest.mark.needs_bm25
def test_bm25_ranks_the_only_matching_doc_first_with_the_hand_computed_score(tmp_path):
    r = BM25Retriever(write_corpus(tmp_path / "c.jsonl", TINY), cache_dir=tmp_path / "cache")
    got = r.retrieve("Tell me about the zebras", 1)
    assert [p.title for p in got] == ["Zebra"]
    # Lucene's BM25 (k1=1.5, b=0.75; like Lucene 8+, no (k1 + 1) factor in the numerator):
    # idf(t) * tf / (tf + k1 * (1 - b + b * dl / avgdl)), idf = ln(1 + (N - df + .5) / (df + .5)).
    # Doc tokens: title + text, stop words out, plurals folded:
    # [zebra, zebra, stripe, savanna] (4), [kettle, kettle, boil, water] (4),
    # [violin, violin, string, music, concert] (5): avgdl = 13/3; "zebra": tf 2, df 1, N 3.
    # "tell" is in no document and adds nothing.
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    expected = idf * 2 / (2 + 1.5 * (1 - 0.75 + 0.75 * 4 / (13 / 3)))
    assert got[0].score == pytest.approx(expected, rel=1e-5)
    assert got[0].text == "zebra stripes savanna"
    assert [p.title for p in r.retrieve("strings concert", 1)] == ["Violin"]


@pytest.mark.needs_bm25
def test_bm25_k_larger_than_corpus_returns_everything_ties_in_corpus_order(tmp_path):
    r = BM25Retriever(write_corpus(tmp_path / "c.jsonl", TINY), cache_dir=tmp_path / "cache")
    got = r.retrieve("boiling kettle", 10)
    assert [p.title for p in got] == ["Kettle", "Zebra", "Violin"]
    assert got[0].score > 0 and got[1].score == 0.0 and got[2].score == 0.0
    # A query of stop words / unknown words only: everything scores 0, corpus order.
    assert [(p.title, p.score) for p in r.retrieve("what is the", 5)] == \
        [("Zebra", 0.0), ("Kettle", 0.0), ("Violin", 0.0)]
    assert [p.title for p in r.retrieve("", 2)] == ["Zebra", "Kettle"]
    assert len(r) == 3


@pytest.mark.needs_bm25
def test_bm25_index_is_cached_and_reloaded_without_rebuilding(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "c.jsonl", TINY)
    cache = tmp_path / "cache"
    first = BM25Retriever(corpus, cache_dir=cache)
    assert first.built and first.index_dir.parent == cache / "bm25"
    assert (first.index_dir / "selfrag-index.json").is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr(retrievers, "_build_index", no_build)
    second = BM25Retriever(corpus, cache_dir=cache)
    assert not second.built and second.index_dir == first.index_dir
    assert second.retrieve("water", 3) == first.retrieve("water", 3)

    # Different corpus bytes -> a different key -> a build (which now fails loudly).
    write_corpus(corpus, TINY + [{"title": "New", "text": "new passage"}])
    with pytest.raises(AssertionError, match="rebuilt"):
        BM25Retriever(corpus, cache_dir=cache)


@pytest.mark.needs_bm25
def test_bm25_cache_defaults_to_selfrag_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFRAG_CACHE", str(tmp_path / "envcache"))
    r = BM25Retriever(write_corpus(tmp_path / "c.jsonl", TINY))
    assert r.index_dir.parent == tmp_path / "envcache" / "bm25"


@pytest.mark.needs_bm25
def test_bm25_rebuilds_over_an_interrupted_build(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", TINY)
    first = BM25Retriever(corpus, cache_dir=tmp_path)
    (first.index_dir / "selfrag-index.json").unlink()       # as if the build stopped before finishing
    again = BM25Retriever(corpus, cache_dir=tmp_path)
    assert again.built and again.retrieve("zebra", 1)[0].title == "Zebra"


@pytest.mark.needs_bm25
def test_bm25_corpus_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        BM25Retriever(missing, cache_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a", "text": "b"}\n\n{"title": "c", "text": }\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: invalid JSON"):
        BM25Retriever(bad, cache_dir=tmp_path)
    bad.write_text('{"title": "a", "text": "b"}\n{"title": "c"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: field 'text' must be a string"):
        BM25Retriever(bad, cache_dir=tmp_path)
    bad.write_text('["a", "b"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: expected a JSON object"):
        load_corpus(bad)
    bad.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl holds no passages"):
        BM25Retriever(bad, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="is a directory"):
        BM25Retriever(tmp_path, cache_dir=tmp_path)
    assert not (tmp_path / "bm25").exists() or not any((tmp_path / "bm25").iterdir())


# ---------------------------------------------------------------------------
# The embedded default corpus

@pytest.mark.needs_bm25
def test_default_corpus_is_well_formed():
    docs = load_corpus(DEFAULT_CORPUS)
    assert 60 <= len(docs) <= 120
    assert len({d["title"] for d in docs}) == len(docs)
    assert len({d["id"] for d in docs}) == len(docs)
    for d in docs:
        # Hand-written passages are paragraphs; the made-up entities' (for the demo) are short.
        low = 8 if d["id"].startswith("fictional-") else 40
        assert low <= len(d["text"].split()) <= 150, d["title"]
    assert sum(d["id"].startswith("fictional-") for d in docs) == 14


@pytest.fixture(scope="module")
def default_bm25(tmp_path_factory):
    return default_retriever(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.needs_bm25
def test_default_retriever_llamas_vs_alpacas(default_bm25):
    top = default_bm25.retrieve("Can you tell me the difference between llamas and alpacas?", 5)
    assert len(top) == 5
    assert "llama" in top[0].title.lower() or "alpaca" in top[0].title.lower()
    assert "llama" in top[0].text.lower() and "alpaca" in top[0].text.lower()
    assert [p.score for p in top] == sorted((p.score for p in top), reverse=True)


@pytest.mark.needs_bm25
def test_default_retriever_odd_one_out(default_bm25):
    top = default_bm25.retrieve("Leave odd one out: twitter, instagram, whatsapp.", 3)
    assert any("messaging" in p.text.lower() for p in top)
    assert "whatsapp" in top[0].text.lower()
