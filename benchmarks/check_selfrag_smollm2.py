"""Has the Self-RAG SmolLM2 learned the format? Reflection tokens in the right places on
held-out prompts (issue 29's first run; issue 30 evaluates it in full).

For each example kind of ``selfrag.training.smollm2_data`` drawn from the HELD-OUT split
(name styles, phrasings, real-fact passages and instructions training never drew), the
model continues the prompt greedily, the way the Self-RAG pipeline prompts it: the
instruction alone for the retrieval decision, and instruction plus one passage
(``[Retrieval]<paragraph>title\\ntext</paragraph>``) for the rest. Measured:

* ``retrieval_decision``: the first token is ``[Retrieval]`` for questions about an entity
  and ``[No Retrieval]`` for instructions that need none;
* ``relevance``: the first token after a passage is ``[Relevant]`` exactly when the passage
  answers (gold passages) and ``[Irrelevant]`` otherwise (another entity's passage, the
  entity's passage without the asked fact);
* ``answer_match``: the answer holds the value the passage states (made-up entities: read
  back from the passage by ``relations.stated_answer``; real facts: the record's answer);
* ``closed``: PubHealth-style ``true``/``false`` and ARC-style letters right;
* ``layout``: the continuation is relevance token, text, support token, utility token,
  end of sequence (and ``[No Retrieval]`` text ``[Utility:k]`` end without retrieval).

Beside it, the same prompts on the base with Self-RAG's vocabulary and no training: what
the format owes to the adapter.

    python benchmarks/check_selfrag_smollm2.py [--per-kind 40] [--model DIR | --adapter DIR] [--no-base]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_json  # noqa: E402

KINDS = ("gold", "irrelevant", "missing", "claim", "choice", "real_gold", "real_irrelevant", "no_retrieval",
         "retrieval_question", "long_form")
RETRIEVE = {"gold", "irrelevant", "missing", "real_gold", "real_irrelevant", "retrieval_question", "claim", "choice",
            "long_form"}


def held_out_examples(per_kind: int) -> list[dict]:
    from selfrag.training.smollm2_data import make_examples
    out = []
    for kind in KINDS:
        out += make_examples(per_kind, seed=0, split="heldout", weights={kind: 1})
    return out


def passage_prefix(output: str) -> str:
    """The first passage block of an example's output (what the pipeline appends)."""
    end = output.find("</paragraph>")
    return output[:end + len("</paragraph>")] if end >= 0 else ""


def judge(ex: dict, decision: str, continuation: str, eos: str) -> dict:
    from selfrag import tokens as T
    from selfrag.training.relations import stated_answer
    from selfrag.training.smollm2_data import realfacts
    kind = ex["kind"]
    want_retrieve = kind in RETRIEVE
    row = {"kind": kind, "retrieval_decision": decision == (T.RETRIEVAL if want_retrieve else T.NO_RETRIEVAL)}
    if kind == "no_retrieval":
        row["layout"] = bool(re.fullmatch(r"\[No Retrieval\].+\[Utility:[1-5]\]" + re.escape(eos), decision
                                          + continuation, re.S))
        return row
    rel_tok = re.escape(T.RELEVANT) + "|" + re.escape(T.IRRELEVANT)
    sup = "|".join(map(re.escape, T.GROUNDNESS_TOKENS))
    m = re.match(rf"({rel_tok})(.*?)({sup})", continuation, re.S)
    expected_relevant = re.search(re.escape(T.RELEVANT), ex["output"][len(passage_prefix(ex["output"])):][:12])
    first = continuation.split("]")[0] + "]" if continuation.startswith("[") else ""
    row["relevance"] = first == (T.RELEVANT if expected_relevant else T.IRRELEVANT)
    if kind != "long_form":
        row["layout"] = bool(re.fullmatch(rf"({rel_tok})[^\[]*?({sup})\[Utility:[1-5]\]" + re.escape(eos),
                                          continuation, re.S))
    answer = m.group(2).strip() if m else ""
    instruction, text = ex["instruction"], passage_prefix(ex["output"]).split("\n", 1)[-1][:-len("</paragraph>")]
    if kind == "gold":
        gold = stated_answer(instruction, text)
        row["answer_match"] = bool(gold) and gold[0].lower() in answer.lower()
    elif kind == "real_gold":
        golds = [qa["answer"] for r in realfacts() for qa in r["qa"] if qa["question"] == instruction]
        row["answer_match"] = any(g.lower() in answer.lower() for g in golds)
    elif kind in ("claim", "choice") and expected_relevant:
        want = ex["output"][len(passage_prefix(ex["output"])):].split("]", 1)[1].split("[")[0]
        row["closed"] = answer == want
    return row


def run(model_dir: str, examples: list[dict]) -> tuple[list[dict], float]:
    from engine import LLM, SamplingParams
    from selfrag.prompts import format_prompt
    llm = LLM(model_dir, device="cpu", dtype="float32", show_progress=False)
    eos = llm.get_tokenizer().eos_token
    t0 = time.perf_counter()
    one = SamplingParams(temperature=0, max_tokens=1, skip_special_tokens=False)
    decisions = [o.outputs[0].text for o in llm.generate([format_prompt(ex["instruction"]) for ex in examples], one,
                                                         use_tqdm=False)]
    prompts, params = [], []
    for ex in examples:
        if ex["kind"] == "no_retrieval":
            prompts.append(format_prompt(ex["instruction"]) + decisions[len(prompts)])
            params.append(SamplingParams(temperature=0, max_tokens=160, skip_special_tokens=False))
        else:
            prompts.append(format_prompt(ex["instruction"]) + passage_prefix(ex["output"]))
            params.append(SamplingParams(temperature=0, max_tokens=64, skip_special_tokens=False))
    outs = llm.generate(prompts, params, use_tqdm=False)
    rows = []
    for ex, d, o in zip(examples, decisions, outs):
        c = o.outputs[0]
        text = c.text + (eos if c.finish_reason == "stop" else "")
        rows.append({**judge(ex, d, text, eos), "instruction": ex["instruction"][-160:], "decision": d,
                     "continuation": text[:300]})
    return rows, time.perf_counter() - t0


def summarize(rows: list[dict]) -> dict:
    out = {}
    for key in ("retrieval_decision", "relevance", "answer_match", "closed", "layout"):
        vals = [r[key] for r in rows if key in r]
        out[key] = {"accuracy": round(sum(vals) / len(vals), 3), "n": len(vals)} if vals else None
    out["by_kind"] = {}
    for kind in KINDS:
        ks = [r for r in rows if r["kind"] == kind]
        out["by_kind"][kind] = {key: round(sum(r[key] for r in ks if key in r) / max(1, sum(key in r for r in ks)), 3)
                                for key in ("retrieval_decision", "relevance", "answer_match", "closed", "layout")
                                if any(key in r for r in ks)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-kind", type=int, default=40)
    ap.add_argument("--model", default=None, help="merged checkpoint (default: selfrag_smollm2_dir())")
    ap.add_argument("--adapter", default=None, help="adapter directory to merge and check (default: the shipped one)")
    ap.add_argument("--no-base", action="store_true", help="skip the untrained base")
    ap.add_argument("--out", default="selfrag_smollm2_format.json", help="file name under benchmarks/results")
    args = ap.parse_args(argv)
    import torch
    torch.manual_seed(0)
    from selfrag.smollm2 import selfrag_smollm2_dir
    from selfrag.smollm2_vocab import selfrag_vocab_dir
    examples = held_out_examples(args.per_kind)
    result = {"examples": len(examples), "per_kind": args.per_kind, "split": "heldout", "models": {}}
    merged = args.model or (selfrag_smollm2_dir(adapter_dir=args.adapter) if args.adapter else selfrag_smollm2_dir())
    models = {"selfrag-smollm2": merged}
    if not args.no_base:
        models["base + Self-RAG vocabulary, untrained"] = selfrag_vocab_dir()
    for name, path in models.items():
        rows, seconds = run(path, examples)
        result["models"][name] = {"dir": path, "seconds": round(seconds, 1), **summarize(rows),
                                  "samples": rows[::max(1, args.per_kind // 4)]}
        s = result["models"][name]
        print(f"{name}: " + ", ".join(f"{k} {s[k]['accuracy']:.2f} (n={s[k]['n']})" for k in
                                      ("retrieval_decision", "relevance", "answer_match", "closed", "layout")
                                      if s[k]) + f"  [{seconds:.0f} s]")
    print("wrote", *write_json(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
