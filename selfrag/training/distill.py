"""The base model's own answers to instructions that need no retrieval (self-distillation).

    python -m selfrag.training.distill [--max-tokens 128] [--limit N]

Runs the pinned SmolLM2-135M-Instruct (``selfrag.smollm2_vocab.BASE_NAME``, fetched from
PyPI once) greedily, through this engine and its own chat template, on every instruction
of ``selfrag/data/instructions_no_retrieval.jsonl``, and writes
``selfrag/data/smollm2_distilled.jsonl``: ``{"id", "instruction", "answer", "finished", "repetitive"}``.
The Self-RAG training data answers these instructions with exactly that text after
``[No Retrieval]``, so the fine-tuned model learns *when* not to retrieve without
unlearning *how* the base answers. An answer cut at ``--max-tokens`` is trimmed to its
last full sentence (``finished`` is then false). Greedy decoding makes the file a
function of the base and the instruction list; it is committed, so training never needs
to run this.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from selfrag.training.smollm2_data import DISTILLED, NO_RETRIEVAL_INSTRUCTIONS, _load


def trim_to_sentence(text: str) -> str:
    """``text`` up to its last sentence end (``.``, ``!``, ``?`` or a line end), stripped."""
    cut = max(text.rfind(c) for c in (".", "!", "?", "\n"))
    return (text[:cut + 1] if cut > 0 else text).strip()


def repetitive(text: str, n: int = 4, times: int = 3) -> bool:
    """A word ``n``-gram occurring ``times`` or more: the greedy loop a small model falls
    into ("a river's flow, a river's flow, ..."). Such answers are kept in the file but
    marked, and never trained on: they would teach the loop."""
    words = text.lower().split()
    counts: dict = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        counts[g] = counts.get(g, 0) + 1
        if counts[g] >= times:
            return True
    return False


def distill(max_tokens: int = 128, limit: int | None = None, out: str | os.PathLike = DISTILLED,
            cache_dir: str | None = None) -> list[dict]:
    from engine.llm import LLM
    from engine.model.pypi_models import pypi_model_dir
    from engine.sampling_params import SamplingParams
    from selfrag.smollm2_vocab import BASE_NAME

    records = list(_load(NO_RETRIEVAL_INSTRUCTIONS))[:limit]
    llm = LLM(pypi_model_dir(BASE_NAME, cache_dir), dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": r["instruction"]}] for r in records], params)
    rows = []
    for r, o in zip(records, outs):
        c = o.outputs[0]
        finished = c.finish_reason == "stop"
        answer = c.text.strip() if finished else trim_to_sentence(c.text)
        rows.append({"id": r["id"], "instruction": r["instruction"], "answer": answer, "finished": finished,
                     "repetitive": repetitive(answer)})
    tmp = f"{out}.part"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(f"{len(rows)} answers ({sum(r['finished'] for r in rows)} finished, "
          f"{sum(r['repetitive'] for r in rows)} repetitive) in "
          f"{time.perf_counter() - t0:.0f} s -> {out}", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=str(DISTILLED))
    args = ap.parse_args(argv)
    distill(args.max_tokens, args.limit, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
