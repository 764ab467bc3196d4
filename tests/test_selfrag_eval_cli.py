"""``selfrag.evaluate`` (loaders, the ``match`` metric, ``evaluate``) and the
``selfrag ask`` / ``selfrag eval`` subcommands.

The metric is checked on hand-written predictions; ``evaluate``'s arithmetic
on a fake ``SelfRAG`` whose answers the test controls; the end-to-end runs use
the embedded random-weight default model (built once into a temporary cache),
so only ranges and consistency are checked there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from selfrag import default_model as dm
from selfrag.evaluate import evaluate, load_eval_file, match, parse_record, write_predictions
from selfrag.types import Candidate, Passage, Result, Scores

FIXTURES = Path(__file__).with_name("fixtures")
POPQA = FIXTURES / "eval_small.jsonl"
ARC = FIXTURES / "arc_small.jsonl"
PUBHEALTH = FIXTURES / "pubhealth_small.jsonl"
RESULT_KEYS = {"answer", "retrieved", "retrieval_prob", "candidates", "tree", "error"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("selfrag-eval-cache")


@pytest.fixture(scope="module")
def rag(cache):
    from engine import LLM
    from selfrag.pipeline import SelfRAG

    with dm.few_threads(1):
        yield SelfRAG(LLM(dm.random_model_dir(cache), device="cpu", show_progress=False))


@pytest.fixture
def env_cache(cache, rag, monkeypatch):
    """$SELFRAG_CACHE -> the module cache (model built; BM25 index built there on first use)."""
    monkeypatch.setenv(dm.CACHE_ENV, str(cache))
    return cache


def _exit_code(fn) -> int:
    try:
        return fn()
    except SystemExit as e:
        return e.code


# ---------------------------------------------------------------- match
@pytest.mark.parametrize("prediction, golds, expected", [
    ("The capital is Paris.", ["Paris"], 1),
    ("The capital is Paris.", ["paris"], 0),                      # case-sensitive
    ("the capital is paris", ["Paris", "paris"], 1),              # any gold
    ("Paris", "Paris", 1),                                        # a single gold string
    ("Paris", [], 0),
    ("[Relevant]Fun[Fully supported]afuti[Utility:5]</s>", ["Funafuti"], 1),   # tokens stripped
    ("Tol</s>kien", ["Tolkien"], 1),
    ("Fun\nafuti", ["Funafuti"], 1),                              # newlines removed
    ("[Retrieval]<paragraph>x</paragraph>Seoul", ["<paragraph>"], 0),
    ("#Paris", ["#P"], 0),                                        # leading '#' dropped ...
    ("#Paris", ["Paris"], 1),
    (":Paris", [":"], 0),                                         # ... or ':'
    ("##x", ["#x"], 1),                                           # only ONE is dropped
    ("a#b", ["a#b"], 1),                                          # not inside
    ("[Relevant]SUPPORTS[Fully supported]", ["true"], 1),         # SUPPORTS -> true
    ("It SUPPORTS the claim", ["SUPPORTS"], 0),                   # the whole prediction becomes "true"
    ("REFUTES", ["false"], 1),
    ("REFUTES", ["true"], 0),
    ("SUPPORTS or REFUTES", ["true"], 1),                         # SUPPORTS wins
    ("supports", ["true"], 0),                                    # case-sensitive keyword
    ("B", ["2"], 0),                                              # ARC gold not remapped
    ("B: a balance", ["B"], 1),
])
def test_match(prediction, golds, expected):
    assert match(prediction, golds) == expected


def test_match_on_already_postprocessed_predictions():
    assert match("#Paris", ["#P"], postprocessed=True) == 1        # no second '#' drop
    assert match("REFUTES", ["false"], postprocessed=True) == 1
    with pytest.raises(ValueError, match="string"):
        match(None, ["x"])


# ---------------------------------------------------------------- loaders
def test_load_fixtures():
    recs = load_eval_file(POPQA, "popqa")
    assert len(recs) == 6 and all(len(r.passages) == 3 for r in recs)
    assert recs[0].golds == ["politician", "Member of Parliament"]
    assert recs[0].passages[0] == Passage("Henry Feilden (Conservative politician)",
                                          recs[0].raw["ctxs"][0]["text"], 1.84)   # "1.84" parsed
    assert recs[2].golds == ["Michael Curtiz"]                                    # 'answer' string
    assert recs[4].where == f"{POPQA}, line 5" and recs[0].choices is None
    arc = load_eval_file(ARC, "arc_c")
    assert [r.golds for r in arc] == [["C"], ["2"], ["B"]]                      # "2" kept as is
    assert arc[1].choices == {"text": ["oxygen", "water", "iron", "helium"], "label": ["1", "2", "3", "4"]}
    assert [len(r.passages) for r in arc] == [3, 2, 3]
    pub = load_eval_file(PUBHEALTH, "pubhealth")
    assert [r.golds for r in pub] == [["true"], ["false"], ["false"]]


def test_load_json_array_blank_lines_and_top_contexts(tmp_path):
    rec = {"question": "q?", "answers": ["a"], "top_contexts": [{"title": "t", "text": "x"}]}
    (tmp_path / "a.json").write_text(json.dumps([rec, rec]))
    assert len(load_eval_file(tmp_path / "a.json", "triviaqa")) == 2
    (tmp_path / "b.jsonl").write_text("\n" + json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    assert [r.where for r in load_eval_file(tmp_path / "b.jsonl", "popqa")] == [
        f"{tmp_path / 'b.jsonl'}, line 2", f"{tmp_path / 'b.jsonl'}, line 4"]


GOOD = {"question": "q?", "answers": ["a"], "ctxs": [{"title": "t", "text": "x"}]}
GOOD_ARC = {**GOOD, "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "A"}


@pytest.mark.parametrize("line, task, message", [
    ('{"question": "q?", "answers": ["a"], "ctxs": [', "popqa", "invalid JSON"),
    ('["q?"]', "popqa", "JSON object"),
    (json.dumps({**GOOD, "question": ""}), "popqa", "'question'"),
    (json.dumps({"question": "q?", "ctxs": GOOD["ctxs"]}), "popqa", "'answers'"),
    (json.dumps({**GOOD, "answers": [1]}), "popqa", "'answers'"),
    (json.dumps({**GOOD, "ctxs": []}), "popqa", "'ctxs'"),
    (json.dumps({**GOOD, "ctxs": [{"title": "t"}]}), "popqa", r"ctxs\[0\]"),
    (json.dumps({**GOOD, "ctxs": [{"title": "t", "text": "x", "score": "high"}]}), "popqa", "score"),
    (json.dumps(GOOD), "arc_c", "choices"),
    (json.dumps({**GOOD, "choices": {"text": ["a", "b"], "label": ["A"]}}), "arc_c", "choices"),
    (json.dumps({**GOOD, "choices": {"text": ["a"], "label": ["A"]}}), "arc_c", "answerKey"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, task, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD_ARC if task == "arc_c" else GOOD) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        load_eval_file(path, task)
    assert f"{path}, line 2" in str(e.value)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.jsonl"):
        load_eval_file(tmp_path / "no-such.jsonl", "popqa")
    with pytest.raises(ValueError, match="unknown eval task"):
        load_eval_file(POPQA, "fever")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_eval_file(tmp_path / "empty.jsonl", "popqa")
    with pytest.raises(ValueError, match="directory"):
        load_eval_file(tmp_path, "popqa")


# ---------------------------------------------------------------- evaluate: arithmetic
class FakeRAG:
    """Answers from a table {question: (answer, retrieved)}; records every call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def answer_batch(self, questions, passages=None, **kw):
        self.calls.append({"questions": list(questions), "passages": passages, **kw})
        out = []
        for q in questions:
            answer, retrieved = self.table[q]
            cand = Candidate(Passage("t", "x"), answer, [], Scores(0.5, 0.0, 0.0, 0.1, 0.6))
            out.append(Result(answer=answer, retrieved=retrieved, retrieval_prob=0.3, candidates=[cand]))
        return out


def test_evaluate_arithmetic_with_a_fake():
    recs = load_eval_file(POPQA, "popqa")
    answers = ["a politician", "Busan", "Michael Curtiz", "rock", "funafuti", "Tolkien"]
    retrieved = [True, True, False, True, False, True]
    fake = FakeRAG({r.question: (a, d) for r, a, d in zip(recs, answers, retrieved)})
    rep = evaluate(fake, recs, "popqa", ndocs=2, batch_size=4, progress=False, w_use=1.0)
    # matches: politician yes, Busan no, Curtiz yes, "rock" (gold "rock music") no,
    # funafuti (case) no, Tolkien yes -> 3/6; retrieved 4/6.
    assert [r["match"] for r in rep["predictions"]] == [1, 0, 1, 0, 0, 1]
    assert rep["n"] == 6 and rep["matched"] == 3 and rep["match"] == 0.5
    assert rep["retrieved"] == 4 and rep["retrieval_frequency"] == pytest.approx(4 / 6)
    assert rep["queries_per_s"] > 0 and rep["max_tokens"] == 100 and rep["ndocs"] == 2
    assert [len(c["questions"]) for c in fake.calls] == [4, 2]
    first = fake.calls[0]
    assert first["task"] is None and first["choices"] is None and first["k"] == 2
    assert first["w_use"] == 1.0 and first["mode"] == "adaptive" and first["max_tokens"] == 100
    assert first["passages"][0] == recs[0].passages[:2]
    assert rep["predictions"][1]["prediction"] == "Busan" and rep["predictions"][1]["golds"] == ["Seoul"]


def test_evaluate_closed_tasks_with_a_fake():
    pub = load_eval_file(PUBHEALTH, "pubhealth")
    fake = FakeRAG({pub[0].question: ("true", True), pub[1].question: ("REFUTES", True),
                    pub[2].question: ("SUPPORTS", True)})
    rep = evaluate(fake, pub, "pubhealth", progress=False)
    assert [r["match"] for r in rep["predictions"]] == [1, 1, 0]
    assert fake.calls[0]["task"] == "fever" and fake.calls[0]["max_tokens"] == 50
    assert fake.calls[0]["k"] == 5 and rep["retrieval_frequency"] == 1.0

    arc = load_eval_file(ARC, "arc_c")
    fake = FakeRAG({arc[0].question: ("C", True), arc[1].question: ("B", False),
                    arc[2].question: ("B", True)})
    rep = evaluate(fake, arc, "arc_c", progress=False)
    assert [r["match"] for r in rep["predictions"]] == [1, 0, 1]      # "B" vs gold "2": no
    assert fake.calls[0]["task"] == "arc_c"
    assert fake.calls[0]["choices"] == [r.choices for r in arc]


def test_evaluate_bad_arguments():
    recs = load_eval_file(POPQA, "popqa")
    fake = FakeRAG({})
    for kw in ({"ndocs": 0}, {"batch_size": 0}, {"max_tokens": -1}):
        with pytest.raises(ValueError, match="positive"):
            evaluate(fake, recs, "popqa", progress=False, **kw)
    with pytest.raises(ValueError, match="no records"):
        evaluate(fake, [], "popqa", progress=False)
    with pytest.raises(ValueError, match="unknown eval task"):
        evaluate(fake, recs, "nq", progress=False)


def test_write_predictions(tmp_path):
    rows = [{"a": 1, "p": float("nan")}, {"a": "é"}]
    assert write_predictions(tmp_path / "p.jsonl", rows) == 2
    lines = (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [{"a": 1, "p": None}, {"a": "é"}]
    with pytest.raises(FileNotFoundError):
        write_predictions(tmp_path / "missing-dir" / "p.jsonl", rows)


# ---------------------------------------------------------------- evaluate: embedded model
@pytest.mark.parametrize("path, task", [(POPQA, "popqa"), (ARC, "arc_c"), (PUBHEALTH, "pubhealth")])
def test_evaluate_embedded_model(rag, path, task):
    recs = load_eval_file(path, task)
    with dm.few_threads(1):
        rep = evaluate(rag, recs, task, ndocs=2, batch_size=4, max_tokens=4, progress=False)
    assert rep["n"] == len(recs) == len(rep["predictions"])
    assert 0.0 <= rep["match"] <= 1.0 and 0.0 <= rep["retrieval_frequency"] <= 1.0
    assert rep["queries_per_s"] > 0
    rows = rep["predictions"]
    assert rep["matched"] == sum(match(r["prediction"], r["golds"], postprocessed=True) for r in rows)
    assert rep["retrieved"] == sum(r["retrieved"] for r in rows)
    for r, rec in zip(rows, recs):
        n_cands = min(2, len(rec.passages)) if r["retrieved"] else 1
        assert len(r["candidates"]) == n_cands
        finals = [c["scores"]["final"] for c in r["candidates"]]
        assert finals == sorted(finals, reverse=True)


def test_evaluate_modes_fix_retrieval_frequency(rag):
    recs = load_eval_file(POPQA, "popqa")[:3]
    with dm.few_threads(1):
        never = evaluate(rag, recs, "popqa", mode="never", max_tokens=2, progress=False)
        always = evaluate(rag, recs, "popqa", mode="always", max_tokens=2, progress=False)
    assert never["retrieval_frequency"] == 0.0 and always["retrieval_frequency"] == 1.0
    assert all(r["retrieval_prob"] is None for r in always["predictions"])


# ---------------------------------------------------------------- CLI
@pytest.mark.needs_bm25
def test_cli_ask_plain(env_cache, capsys):
    from selfrag.cli import main

    assert main(["ask", "--device", "cpu", "Can you tell me the difference between llamas and alpacas?", "--k", "3",
                 "--max-tokens", "6", "--mode", "always"]) == 0
    cap = capsys.readouterr()
    assert "embedded miniature Self-RAG model" in cap.err
    out = cap.out
    assert out.startswith("answer: ") and "retrieved: yes" in out
    assert "candidates, best first (3):" in out and out.count("final=") == 3
    assert "rel=" in out and "sup=" in out and "use=" in out and "seq=" in out
    assert "[Llamas and alpacas: how to tell them apart]" in out       # the BM25 top hit


def test_cli_ask_json_with_passages_file(env_cache, tmp_path, capsys):
    from selfrag.cli import main

    passages = [{"title": "Alpha", "text": "first passage"}, {"title": "Beta", "text": "second"}]
    (tmp_path / "p.json").write_text(json.dumps(passages))
    assert main(["ask", "--device", "cpu", "What is alpha?", "--passages", str(tmp_path / "p.json"), "--mode", "always",
                 "--max-tokens", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)                        # JSON only on stdout
    assert set(data) == RESULT_KEYS and data["retrieved"] is True
    assert sorted(c["passage"]["title"] for c in data["candidates"]) == ["Alpha", "Beta"]
    assert all(set(c["scores"]) == {"rel", "sup", "use", "seq", "final"} for c in data["candidates"])
    assert Result.from_dict(data).answer == data["answer"]

    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in passages))
    assert main(["ask", "--device", "cpu", "q", "--passages", str(tmp_path / "p.jsonl"), "--mode", "never",
                 "--max-tokens", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["retrieved"] is False and data["candidates"][0]["passage"] is None


def test_cli_ask_long(env_cache, tmp_path, capsys):
    from selfrag.cli import main

    passages = tmp_path / "p.jsonl"
    passages.write_text("\n".join(json.dumps({"title": t, "text": f"{t} text"}) for t in ("A", "B", "C")))
    argv = ["ask", "--device", "cpu", "Tell me about alpacas.", "--long", "--passages", str(passages), "--k", "2",
            "--max-depth", "2", "--max-tokens", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("answer: ") and "segments of the best path" in out and "search tree:" in out
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == RESULT_KEYS and isinstance(data["tree"], list) and len(data["tree"]) > 1
    assert 1 <= len(data["candidates"]) <= 2
    assert {c["passage"]["title"] for c in data["candidates"]} <= {"A", "B"}       # k=2: never C


@pytest.mark.needs_bm25
def test_cli_ask_corpus(env_cache, tmp_path, capsys):
    from selfrag.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"title": t, "text": x}) for t, x in [
        ("Zebra", "zebras have stripes"), ("Moon", "the moon orbits the earth"), ("Tea", "tea is a drink")]))
    assert main(["ask", "--device", "cpu", "What orbits the earth?", "--corpus", str(corpus), "--k", "1",
                 "--mode", "always", "--max-tokens", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["passage"]["title"] for c in data["candidates"]] == ["Moon"]


def test_cli_eval_end_to_end(env_cache, tmp_path, capsys):
    from selfrag.cli import main

    pred = tmp_path / "pred.jsonl"
    assert main(["eval", "--device", "cpu", "--task", "popqa", "--input", str(POPQA), "--ndocs", "2",
                 "--max-tokens", "3", "--output", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "6 records" in out and "match: " in out and "retrieval frequency: " in out
    assert "queries/s: " in out and str(pred) in out
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 6 and [r["question"] for r in rows] == [r.question for r in load_eval_file(POPQA, "popqa")]
    matched = sum(r["match"] for r in rows)
    assert f"match: {matched / 6:.4f} ({matched}/6)" in out

    assert main(["eval", "--device", "cpu", "--task", "arc_c", "--input", str(ARC), "--limit", "2", "--max-tokens", "2",
                 "--mode", "never"]) == 0
    out = capsys.readouterr().out
    assert "2 records" in out and "retrieval frequency: 0.0000 (0/2)" in out


@pytest.mark.needs_bm25
def test_cli_eval_with_bm25_instead_of_ctxs(env_cache, tmp_path, capsys):
    """--retriever bm25 answers from BM25 over --corpus: records may lack ctxs, and
    the passages each question got are the corpus's top documents for it."""
    from selfrag.cli import main
    from selfrag.retrievers import BM25Retriever

    corpus = tmp_path / "corpus.jsonl"
    docs = [{"id": str(i), "title": t, "text": x} for i, (t, x) in enumerate([
        ("Zorvia", "The capital of Zorvia is Quelmar."), ("Bantu", "Bantu is a town of 900 people."),
        ("Lemo Tower", "The Lemo Tower is 80 metres tall."), ("Kip", "Kip eats red moss.")])]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "What is the capital of Zorvia?", "answers": ["Quelmar"]})
                    + "\n" + json.dumps({"question": "How tall is the Lemo Tower?", "answers": ["80"],
                                         "ctxs": [{"title": "x", "text": "ignored"}]}) + "\n")
    pred = tmp_path / "pred.jsonl"
    argv = ["eval", "--device", "cpu", "--task", "popqa", "--input", str(data), "--max-tokens", "2"]
    assert main(argv + ["--retriever", "bm25", "--corpus", str(corpus), "--ndocs", "2", "--mode", "always",
                        "--output", str(pred)]) == 0
    assert "from BM25 over" in capsys.readouterr().out
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    bm25 = BM25Retriever(corpus)
    for row in rows:
        want = [p.title for p in bm25.retrieve(row["question"], 2)]
        assert sorted(c["title"] for c in row["candidates"]) == sorted(want)
    assert rows[0]["candidates"] and "Zorvia" in [c["title"] for c in rows[0]["candidates"]]
    # Without a retriever a record lacking ctxs is an error that names it; --corpus needs bm25.
    assert _exit_code(lambda: main(argv)) == 2
    assert "line 1" in capsys.readouterr().err
    assert _exit_code(lambda: main(argv + ["--corpus", str(corpus)])) == 2
    assert "--corpus needs --retriever bm25" in capsys.readouterr().err


def test_cli_errors_exit_2(env_cache, tmp_path, capsys):
    from selfrag.cli import main

    missing = tmp_path / "missing.jsonl"
    assert _exit_code(lambda: main(["eval", "--device", "cpu", "--task", "popqa", "--input", str(missing)])) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n{oops\n")
    assert _exit_code(lambda: main(["eval", "--device", "cpu", "--task", "popqa", "--input", str(bad)])) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2" in err and len(err.strip().splitlines()) == 1

    assert _exit_code(lambda: main(["ask", "--device", "cpu", "q", "--passages", str(missing)])) == 2
    assert str(missing) in capsys.readouterr().err
    assert _exit_code(lambda: main(["ask", "--device", "cpu", "q", "--long", "--mode", "never"])) == 2
    assert _exit_code(lambda: main(["ask", "--device", "cpu", "q", "--task", "nosuchtask"])) == 2
    assert "unknown task" in capsys.readouterr().err
    # argparse
    assert _exit_code(lambda: main(["eval", "--device", "cpu", "--task", "nq", "--input", str(POPQA)])) == 2
    assert _exit_code(lambda: main(["ask", "--device", "cpu", "q", "--passages", "a", "--corpus", "b"])) == 2


def test_parse_record_directly():
    rec = parse_record({"question": "q", "answer": ["x", "y"], "ctxs": [{"title": None, "text": "t"}]}, "popqa")
    assert rec.golds == ["x", "y"] and rec.passages == [Passage("", "t", None)]


def test_without_bm25s_ask_exits_2_and_demo_skips_its_ask_part(env_cache, monkeypatch, capsys):
    import sys

    from selfrag import demo
    from selfrag.cli import main

    monkeypatch.setitem(sys.modules, "bm25s", None)          # import bm25s -> ImportError
    assert _exit_code(lambda: main(["ask", "--device", "cpu", "q", "--max-tokens", "2"])) == 2
    err = capsys.readouterr().err
    assert "bm25s" in err and "--passages" in err and "Traceback" not in err
    assert demo.main(["--device", "cpu", "--max-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "skipped, BM25 retrieval needs the bm25s package" in out
    assert out.count("finish_reason=") == 3 and "embedded miniature Self-RAG model" in out


@pytest.mark.needs_bm25
def test_demo_runs_ask_on_three_questions(env_cache, capsys):
    from selfrag import demo

    assert demo.main(["--device", "cpu", "--max-tokens", "3"]) == 0
    out = capsys.readouterr().out
    ask = out[out.index("Self-RAG pipeline (selfrag ask)"):]
    assert ask.count("=== ask:") == 3 and ask.count("answer: ") == 3 and ask.count("retrieved: ") == 3
    assert "final=" in ask and "max_tokens=3" in ask
    assert ask.rstrip().splitlines()[-1].startswith("serve it over an OpenAI-compatible HTTP API")


def test_cli_ask_says_when_adaptive_retrieval_skipped_the_passages(env_cache, tmp_path, capsys):
    from selfrag.cli import main
    (tmp_path / "p.json").write_text(json.dumps([{"title": "Alpaca", "text": "A camelid."}]))
    argv = ["ask", "--device", "cpu", "What is an alpaca?", "--passages", str(tmp_path / "p.json"),
            "--max-tokens", "3"]
    assert main(argv + ["--threshold", "1.0"]) == 0                 # never retrieves
    err = capsys.readouterr().err
    assert "adaptive retrieval decided not to use the 1 passages" in err and "--mode always" in err
    assert main(argv + ["--mode", "always"]) == 0
    assert "decided not to use" not in capsys.readouterr().err
    assert _exit_code(lambda: main(["ask", "--device", "cpu", "  "])) == 2
    assert "the question is empty" in capsys.readouterr().err


def test_cli_generate_applies_the_selfrag_template_unless_raw(env_cache, capsys):
    import re

    from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
    from selfrag.cli import main
    from selfrag.prompts import format_prompt
    tok = Tokenizer.from_pretrained(dm.default_model_dir())
    counts = []
    for extra in ([], ["--raw"]):
        assert main(["generate", "--device", "cpu", "--max-tokens", "2", "What is an alpaca?", *extra]) == 0
        counts.append(int(re.search(r"prompt (\d+) tokens", capsys.readouterr().err).group(1)))
    assert counts == [len(tok.encode(format_prompt("What is an alpaca?"))), len(tok.encode("What is an alpaca?"))]


def test_cli_quantization_flag_reaches_the_engine(env_cache, capsys, monkeypatch):
    """--quantization int8 builds an int8 engine; anything else is refused by argparse."""
    import engine.llm as llm_mod
    from selfrag.cli import main
    seen = []
    real = llm_mod.LLM.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("quantization"))
        real(self, *a, **kw)
    monkeypatch.setattr(llm_mod.LLM, "__init__", spy)
    assert main(["generate", "--device", "cpu", "--max-tokens", "2", "--quantization", "int8", "Hi"]) == 0
    assert seen == ["int8"]
    assert _exit_code(lambda: main(["generate", "--quantization", "awq", "Hi"])) == 2
    assert "invalid choice: 'awq'" in capsys.readouterr().err


def test_the_console_entry_exits_with_main_status_and_flushed_output(tmp_path):
    """``python -m selfrag.cli`` (the console script's entry: main, then a fast exit that
    skips Python's teardown) keeps main's exit status and everything it printed."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}
    ok = subprocess.run([sys.executable, "-m", "selfrag.cli", "generate", "--device", "cpu", "--max-tokens", "3",
                         "--show-special-tokens", "hello"], cwd=repo, env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip() and "3 tokens" in ok.stderr
    bad = subprocess.run([sys.executable, "-m", "selfrag.cli", "generate", "--device", "cpu", "--model",
                          str(tmp_path / "missing"), "hi"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("no such directory")
    usage = subprocess.run([sys.executable, "-m", "selfrag.cli", "no-such-command"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
