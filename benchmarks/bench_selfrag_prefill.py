"""Prefilled positions and time of Self-RAG short form and long form, against the
positions that are new text (what a perfect KV reuse would prefill).

    python benchmarks/bench_selfrag_prefill.py [--model DIR] [--label NAME] [--passages 5]

Short form: ``SelfRAG.answer`` (adaptive: the retrieval decision, then one branch per
passage). Long form: ``SelfRAG.generate_long`` (beam width 2, depth 3, 40-token
segments). The new text: the question prompt once and each branch's passage once
(generated segments are decoded, not prefilled). ``prefilled`` is the engine's count
(``llm.scheduler.num_prefill_tokens``), so the difference is what was computed again
(at most one token per long-form child is new too: the last token of a segment that
did not end in ``[Retrieval]``, sampled but not yet fed back).
Writes benchmarks/results/selfrag_prefill_<label>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_selfrag import QUESTION, passages  # noqa: E402
from benchmarks.common import record, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--label", default="cpu")
    ap.add_argument("--passages", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from engine import LLM
    from selfrag import SelfRAG
    from selfrag.default_model import default_model_dir
    from selfrag.prompts import format_passage, format_prompt, task_instruction
    model = args.model or default_model_dir()
    rows = []
    for form in ("short", "long"):
        times, counts = [], None
        for rep in range(args.reps + 1):                        # the first is warm-up
            llm = LLM(model, show_progress=False)
            rag = SelfRAG(llm)
            tok = llm.get_tokenizer()
            ps = passages(tok, args.passages, 120)
            t0 = time.perf_counter()
            if form == "short":
                res = rag.answer(QUESTION, passages=ps, mode="adaptive", threshold=0.0)
            else:
                res = rag.generate_long(QUESTION, passages=ps, beam_width=2, max_depth=3, segment_tokens=40)
            secs = time.perf_counter() - t0
            prompt = len(tok.encode(format_prompt(task_instruction(None, QUESTION, None))))
            passage_tokens = [len(tok.encode(format_passage(p), add_special_tokens=False)) for p in ps]
            # new text: the prompt once and every branch's passage once (a branch after a
            # segment that did not end in [Retrieval] also feeds that segment's last token)
            if form == "short":
                new = prompt + (sum(passage_tokens) if res.retrieved else 1)
            else:
                new = prompt + sum(passage_tokens[n["passage"]] for n in res.tree if n["parent"] is not None)
            counts = dict(prefilled=llm.scheduler.num_prefill_tokens, new_text=new)
            if rep:
                times.append(secs)
        rows.append(dict(form=form, seconds=min(times), **counts,
                         recomputed=counts["prefilled"] - counts["new_text"]))
        print(f"{form:5s}: prefilled {counts['prefilled']:5d} positions, new text {counts['new_text']:5d} "
              f"({counts['prefilled'] - counts['new_text']:+d}), {min(times):.3f} s")
    write_json(f"selfrag_prefill_{args.label}.json",
               record(model=os.path.basename(os.path.normpath(model)), passages=args.passages, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
