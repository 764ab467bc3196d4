"""Short-form evaluation on the released Self-RAG eval files (PopQA, TriviaQA, PubHealth, ARC-C).

    records = load_eval_file("popqa_longtail_w_gs.jsonl", "popqa")
    report = evaluate(SelfRAG(llm), records, "popqa")      # ndocs 10, max_tokens 100
    print(report["match"], report["retrieval_frequency"])
    write_predictions("preds.jsonl", report["predictions"])

What mirrors the released ``retrieval_lm/run_short_form.py`` (+ ``metrics.py``):

* Files: JSONL (or a ``.json``/``[...]`` array), one record per line with
  ``question``, ``answers`` (or ``answer``: a string or list), and ``ctxs``
  (``top_contexts`` is accepted too, as released) of ``{title, text, score?}``,
  best first.  ARC adds ``choices`` ``{"text": [...], "label": [...]}`` and
  ``answerKey``.  Every record is answered from its OWN ``ctxs[:ndocs]``: no
  live retrieval, as in the paper's short-form numbers.
* Tasks: ``popqa``/``triviaqa`` (open, bare question), ``pubhealth`` (the
  instruction task ``fever``, closed) and ``arc_c`` (closed, choices shown).
* Gold: ``answers``; for ARC ``[answerKey]``.  Labels "1"-"4" are SHOWN as A-D
  in the prompt but the gold key is NOT remapped (as released), so such a
  question can only match if the model writes the digit.
* ``match``: 1 if any gold string is a case-sensitive substring of the
  post-processed prediction (reflection tokens, ``</s>`` and newlines removed,
  one leading ``#``/``:`` dropped), after ``SUPPORTS`` -> ``true`` /
  ``REFUTES`` -> ``false`` (applied for every task, as released).
* Defaults per task (the published commands): ndocs 10 / max_tokens 100 for
  PopQA and TriviaQA, 5 / 50 for PubHealth and ARC.

Differences: the released script printed the retrieval frequency as
``count / len(final_results)`` (the number of keys of its output dict, 8);
here it is the fraction of records that retrieved.  Records are answered in
batches (``batch_size``) instead of one by one; greedy decoding makes the
answers the same.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from selfrag.prompts import postprocess_answer
from selfrag.types import Passage, plain

# eval task -> (instruction task given to SelfRAG, ndocs, max_tokens, closed?)
TASKS: dict[str, tuple[str | None, int, int, bool]] = {
    "popqa": (None, 10, 100, False),
    "triviaqa": (None, 10, 100, False),
    "pubhealth": ("fever", 5, 50, True),
    "arc_c": ("arc_c", 5, 50, True),
}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown eval task {task!r}; use one of {', '.join(TASKS)}")
    return task


@dataclass
class EvalRecord:
    """One evaluation question: ``golds`` are the strings ``match`` looks for."""

    question: str
    golds: list[str]
    passages: list[Passage]
    choices: dict | None = None
    where: str = ""                      # "FILE, line N": for messages and predictions
    raw: dict = field(default_factory=dict, repr=False)


# ---------------------------------------------------------------- reading
def read_json_records(path: str | os.PathLike, what: str = "file") -> list[tuple[str, Any]]:
    """``[(where, object)]`` from a JSONL file or a JSON array file.

    A file whose first non-blank character is ``[`` is read as one JSON array
    (``where`` = "FILE, item N"), anything else as JSONL, blank lines skipped
    (``where`` = "FILE, line N").  Errors name the file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory, not a JSON/JSONL file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8: {e}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path}, line {e.lineno}: invalid JSON ({e.msg})") from None
        return [(f"{path}, item {i}", obj) for i, obj in enumerate(items)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}, line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path}, line {lineno}: invalid JSON ({e.msg})") from None
    return out


def _golds(obj: Mapping, where: str) -> list[str]:
    raw = obj["answers"] if "answers" in obj else obj.get("answer")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(g, str) for g in raw):
        raise ValueError(f"{where}: 'answers' (or 'answer') must be a string or a non-empty list "
                         f"of strings, got {raw!r}")
    return list(raw)


def _passages(obj: Mapping, where: str) -> list[Passage]:
    key = "ctxs" if "ctxs" in obj else "top_contexts"
    ctxs = obj.get(key)
    if not isinstance(ctxs, list) or not ctxs:
        raise ValueError(f"{where}: 'ctxs' must be a non-empty list of {{title, text}} passages, "
                         f"got {type(ctxs).__name__ if ctxs is not None else 'nothing'}")
    out = []
    for j, ctx in enumerate(ctxs):
        try:
            out.append(Passage.from_dict(ctx))
        except ValueError as e:
            raise ValueError(f"{where}: ctxs[{j}]: {e}") from None
    return out


def _choices(obj: Mapping, where: str) -> dict:
    choices = obj.get("choices")
    if (not isinstance(choices, Mapping) or not isinstance(choices.get("text"), list)
            or not isinstance(choices.get("label"), list)
            or len(choices["text"]) != len(choices["label"])):
        raise ValueError(f"{where}: arc_c needs 'choices' as {{\"text\": [...], \"label\": [...]}} "
                         f"of equal length, got {choices!r}")
    return {"text": [str(t) for t in choices["text"]], "label": [str(x) for x in choices["label"]]}


def parse_record(obj: Any, task: str, where: str = "record", need_passages: bool = True) -> EvalRecord:
    """One eval record (a parsed JSON object) for ``task``; ValueError naming ``where``.

    need_passages=False (a retriever supplies the passages) accepts a record
    without ``ctxs``; its ``passages`` are then empty."""
    check_task(task)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: needs a non-empty string 'question', got {question!r}")
    choices = None
    if task == "arc_c":
        choices = _choices(obj, where)
        key = obj.get("answerKey")
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: arc_c needs a string 'answerKey', got {key!r}")
        golds = [key]                     # not remapped from "1"-"4" to A-D (as released)
    else:
        golds = _golds(obj, where)
    has_ctxs = "ctxs" in obj or "top_contexts" in obj
    passages = _passages(obj, where) if need_passages or has_ctxs else []
    return EvalRecord(question=question, golds=golds, passages=passages,
                      choices=choices, where=where, raw=dict(obj))


def load_eval_file(path: str | os.PathLike, task: str, need_passages: bool = True) -> list[EvalRecord]:
    """All records of an eval file for ``task`` (popqa, triviaqa, pubhealth, arc_c);
    ``need_passages=False`` when a retriever supplies them (``ctxs`` optional)."""
    check_task(task)
    records = [parse_record(obj, task, where, need_passages)
               for where, obj in read_json_records(path, what="eval file")]
    if not records:
        raise ValueError(f"eval file {path} holds no records")
    return records


# ---------------------------------------------------------------- metric
def match(prediction: str, golds: Iterable[str], postprocessed: bool = False) -> int:
    """1 if any gold is a case-sensitive substring of the prediction, else 0.

    The prediction is first post-processed (``prompts.postprocess_answer``),
    unless ``postprocessed`` says that already happened (``SelfRAG`` answers
    are: a second pass would drop a second leading ``#``), then mapped
    ``SUPPORTS`` -> ``true``, else ``REFUTES`` -> ``false``.
    """
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a string, got {type(prediction).__name__}")
    golds = [golds] if isinstance(golds, str) else list(golds)
    pred = prediction if postprocessed else postprocess_answer(prediction)
    if "SUPPORTS" in pred:
        pred = "true"
    elif "REFUTES" in pred:
        pred = "false"
    return int(any(g in pred for g in golds))


# ---------------------------------------------------------------- running
def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _final(c) -> float:
    f = float(c.scores.final)
    return f if f == f else float("-inf")        # NaN sorts last


def _prediction_row(i: int, rec: EvalRecord, result, score: int) -> dict:
    best = sorted(result.candidates, key=_final, reverse=True)
    return {
        "index": i, "where": rec.where, "question": rec.question, "golds": rec.golds,
        "prediction": result.answer, "match": score, "retrieved": bool(result.retrieved),
        "retrieval_prob": plain(result.retrieval_prob),
        "candidates": [{"title": None if c.passage is None else c.passage.title, "text": c.text,
                        "scores": c.scores.to_dict()} for c in best],
    }


def evaluate(rag, records: list[EvalRecord], task: str, ndocs: int | None = None,
             mode: str = "adaptive", batch_size: int = 8, max_tokens: int | None = None,
             progress: bool = True, use_retriever: bool = False, **answer_kwargs) -> dict:
    """Answers every record with ``rag.answer_batch`` and scores it with ``match``.

    rag: a ``SelfRAG`` (or anything with its ``answer_batch``).  Each record
    gets its own ``passages[:ndocs]`` (ARC also its ``choices``), or, with
    ``use_retriever``, the top ``ndocs`` of ``rag.retriever`` for its question
    (the record's ``ctxs`` are ignored).  ndocs /
    max_tokens default to the task's published values; extra keyword
    arguments (threshold, rule, w_rel, w_sup, w_use, use_seqscore,
    constrained) go to ``answer_batch``.

    Returns ``{"task", "n", "match", "matched", "retrieval_frequency",
    "retrieved", "seconds", "queries_per_s", "ndocs", "mode", "max_tokens",
    "predictions"}``: ``match`` and ``retrieval_frequency`` are fractions of
    ``n``; ``predictions`` one row per record (see ``write_predictions``).
    """
    check_task(task)
    inst_task, default_ndocs, default_tokens, _ = TASKS[task]
    ndocs = default_ndocs if ndocs is None else ndocs
    max_tokens = default_tokens if max_tokens is None else max_tokens
    for name, v in (("ndocs", ndocs), ("batch_size", batch_size), ("max_tokens", max_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate")
    if use_retriever and getattr(rag, "retriever", None) is None:
        raise ValueError("use_retriever=True needs a SelfRAG with a retriever")
    missing = [r.where for r in records if not r.passages]
    if missing and not use_retriever:
        raise ValueError(f"{missing[0]}: no 'ctxs' and no retriever (use_retriever=True)")
    from tqdm import tqdm

    rows, seconds = [], 0.0
    with tqdm(total=len(records), desc=f"eval {task}", unit="q", disable=not progress,
              file=sys.stderr) as bar:
        for batch in _batches(records, batch_size):
            t0 = time.perf_counter()
            results = rag.answer_batch(
                [r.question for r in batch],
                passages=None if use_retriever else [r.passages[:ndocs] for r in batch],
                k=ndocs, task=inst_task, mode=mode, max_tokens=max_tokens,
                choices=[r.choices for r in batch] if task == "arc_c" else None, **answer_kwargs)
            seconds += time.perf_counter() - t0
            if len(results) != len(batch):
                raise RuntimeError(f"answer_batch returned {len(results)} results for {len(batch)} questions")
            for rec, res in zip(batch, results):
                rows.append(_prediction_row(len(rows), rec, res,
                                            match(res.answer, rec.golds, postprocessed=True)))
            bar.update(len(batch))
            bar.set_postfix(match=f"{sum(r['match'] for r in rows) / len(rows):.3f}")
    n = len(rows)
    matched = sum(r["match"] for r in rows)
    retrieved = sum(r["retrieved"] for r in rows)
    return {"task": task, "n": n, "match": matched / n, "matched": matched,
            "retrieval_frequency": retrieved / n, "retrieved": retrieved, "seconds": seconds,
            "queries_per_s": n / seconds if seconds > 0 else float("inf"),
            "ndocs": ndocs, "mode": mode, "max_tokens": max_tokens, "predictions": rows}


def write_predictions(path: str | os.PathLike, rows: Iterable[Mapping]) -> int:
    """Writes one JSON object per line (UTF-8); returns the number of rows."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write predictions to {path}: no directory {path.parent}")
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(plain(row), ensure_ascii=False) + "\n")
            n += 1
    return n
