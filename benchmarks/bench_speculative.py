"""Speculative decoding against plain decoding, in the same run, on the same engine settings.

    python benchmarks/bench_speculative.py [--model DIR] [--questions 8] [--device cpu|cuda]

Cases (greedy; n-gram + grammar drafts, 4 at a time, ``SelfRAG(speculative=True)``'s):

* ``selfrag_short`` / ``selfrag_long``: Self-RAG answers of the embedded miniature model
  to held-out PopQA-style questions (benchmarks/data/heldout), at batch 1 (one question
  at a time) and batch 8 (``answer_batch``);
* ``model_card``: the model card's llamas-vs-alpacas prompt with its paragraph;
* ``no_repeats``: a prompt of distinct tokens and plain generation, where drafts find
  little to copy: the back-off should keep it at plain speed.

Per case: generated tokens, verify steps, drafts proposed and accepted, tokens per
verify step (accepted drafts plus the bonus, per sequence that speculated), target
forward passes per generated token, and the wall-clock speedup: the median over
``--pairs`` alternated plain/speculative runs of plain seconds / speculative seconds
(after a warm-up of each), with its range. Targets (issue 18):
Self-RAG short, batch 1: >= 2.0 tokens per verify step and >= 1.5x; no repeats >= 0.95x.
Writes benchmarks/results/speculative_<device>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import device_name, record, slug, write_json  # noqa: E402
from selfrag.pipeline import SPECULATIVE_DEFAULTS as SPEC  # noqa: E402  (SelfRAG(speculative=True)'s)

MODEL_CARD = ("Can you tell me the difference between llamas and alpacas?",
              "The alpaca (Lama pacos) is a species of South American camelid mammal. It is similar to, "
              "and often confused with, the llama. Alpacas are considerably smaller than llamas, and unlike "
              "llamas, they were not bred to be working animals, but were bred specifically for their fiber.")


def questions(n: int) -> list[dict]:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "heldout", "popqa_heldout.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def workloads(model, args):
    """name -> (batch, fn(llm) generating something, passing the tokens generated back)."""
    from engine import SamplingParams
    from selfrag import Passage, SelfRAG
    from selfrag.prompts import format_passage, format_prompt
    qs = questions(args.questions)

    def short(batch):
        def run(llm):
            rag = SelfRAG(llm)
            n = 0
            for i in range(0, len(qs), batch):
                chunk = qs[i:i + batch]
                res = rag.answer_batch([q["question"] for q in chunk], [q["ctxs"][:3] for q in chunk],
                                       mode="always", max_tokens=60)
                n += sum(len(c.token_ids) for r in res for c in r.candidates)
            return n
        return run

    def long(llm):
        rag = SelfRAG(llm)
        return sum(len(n["text"]) > 0 for q in qs[:3]
                   for n in rag.generate_long(q["question"], passages=q["ctxs"][:2], beam_width=2, max_depth=2,
                                              segment_tokens=40).tree)

    def card(llm):
        prompt = format_prompt(MODEL_CARD[0]) + format_passage(Passage("Alpaca", MODEL_CARD[1]))
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=100, skip_special_tokens=False),
                           use_tqdm=False)[0]
        return len(out.outputs[0].token_ids)

    def no_repeats(llm):
        prompt = {"prompt_token_ids": [1] + list(range(100, 100 + 120))}
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True), use_tqdm=False)
        return len(out[0].outputs[0].token_ids)

    return {"selfrag_short_b1": short(1), "selfrag_short_b8": short(8), "selfrag_long_b1": long,
            "model_card_b1": card, "no_repeats_b1": no_repeats}


def run_once(model, device, fn, spec):
    from engine import LLM
    llm = LLM(model, device=device, show_progress=False, speculative_config=SPEC if spec else None)
    t = time.perf_counter()
    tokens = fn(llm)
    secs = time.perf_counter() - t
    s = llm.speculator
    return secs, dict(tokens=tokens, steps=llm.num_steps,
                      verify_steps=s.num_verify_steps if s else 0, drafted=s.num_drafted if s else 0,
                      accepted=s.num_accepted if s else 0, speculating_rows=s.num_speculating_rows if s else 0)


def measure_pairs(model, device, fn, pairs):
    """Plain and speculative runs alternated (after one warm-up of each): this VM's speed
    drifts by 10-40% within a minute, which a plain-then-speculative order would book as a
    speedup or a slowdown. Returns the per-pair ratios, the medians of each side's
    seconds, and the (deterministic) counts of each side."""
    run_once(model, device, fn, False)
    run_once(model, device, fn, True)
    plain_s, spec_s = [], []
    for _ in range(pairs):
        p, plain = run_once(model, device, fn, False)
        s, spec = run_once(model, device, fn, True)
        plain_s.append(p)
        spec_s.append(s)
    ratios = sorted(p / s for p, s in zip(plain_s, spec_s))
    return ratios, statistics.median(plain_s), statistics.median(spec_s), plain, spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=7, help="alternated plain/speculative runs per case")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    args = ap.parse_args()
    from selfrag.default_model import default_model_dir
    model = args.model or default_model_dir()
    rows = []
    for name, fn in workloads(model, args).items():
        if args.cases and name not in args.cases.split(","):
            continue
        ratios, plain_s, spec_s, plain, spec = measure_pairs(model, args.device, fn, args.pairs)
        rows_spec = max(spec["speculating_rows"], 1)
        row = dict(case=name, plain_s=plain_s, spec_s=spec_s, speedup=statistics.median(ratios),
                   speedup_min=ratios[0], speedup_max=ratios[-1], pairs=len(ratios),
                   tokens_per_verify_row=(spec["accepted"] + spec["speculating_rows"]) / rows_spec,
                   accepted_per_verify_row=spec["accepted"] / rows_spec,
                   drafted=spec["drafted"], accepted=spec["accepted"], verify_steps=spec["verify_steps"],
                   forward_passes_per_token_plain=plain["steps"] / max(plain["tokens"], 1),
                   forward_passes_per_token_spec=spec["steps"] / max(spec["tokens"], 1))
        rows.append(row)
        print(f"{name:18s} plain {plain_s:6.3f} s, speculative {spec_s:6.3f} s: {row['speedup']:.2f}x "
              f"(median of {len(ratios)} pairs; {ratios[0]:.2f}-{ratios[-1]:.2f}); "
              f"{row['tokens_per_verify_row']:.2f} tokens per verify row, {spec['accepted']}/{spec['drafted']} "
              f"drafts accepted; steps per step-token {row['forward_passes_per_token_plain']:.2f} -> "
              f"{row['forward_passes_per_token_spec']:.2f}")
    dname = device_name(args.device)
    base = f"speculative_{slug(dname) if args.device == 'cuda' else 'cpu'}"
    write_json(base + ".json", record(device=dname, model=os.path.basename(os.path.normpath(model)),
                                      config=SPEC, rows=rows))
    _plot(rows, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", base + ".png"))
    return 0


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["case"] for r in rows]
    sp = [r["speedup"] for r in rows]
    a.bar(names, sp, color="tab:blue",
          yerr=[[v - r["speedup_min"] for v, r in zip(sp, rows)], [r["speedup_max"] - v for v, r in zip(sp, rows)]],
          capsize=3)
    a.axhline(1.0, color="gray", lw=0.8)
    a.set_ylabel("speedup vs plain (median, range)")
    b.bar(names, [r["tokens_per_verify_row"] for r in rows], color="tab:green")
    b.set_ylabel("tokens per verify row")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
