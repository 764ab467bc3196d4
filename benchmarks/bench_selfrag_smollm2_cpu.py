"""``selfrag ask`` on the Self-RAG SmolLM2 on this CPU, warm, phase by phase (issue 30).

What one ``ask`` costs once the model is built and the BM25 index cached: loading the
checkpoint (``LLM(...)``), retrieval (BM25 over the 263 real-fact passages, top 5, each of
35-90 words), and the Self-RAG answer (the retrieval decision, then one generation per
passage, batched, answers of at most 48 tokens). The answer is split into its prefill part
(the same call with ``max_tokens=1``: the decision, the five passages' prefill and one
token) and the decode part (the rest). fp32 and ``--quantization int8`` (the reference
path on CPU) alternate question by question, after one warm-up answer each. The prefix
cache is off: with it, the full answer would reuse what the ``max_tokens=1`` call just
prefilled, and later rounds the earlier rounds' passages, so the figures would be those of
a question asked twice rather than of a new one (``selfrag ask`` starts with an empty
cache).

    python benchmarks/bench_selfrag_smollm2_cpu.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import record, write_json  # noqa: E402

QUESTIONS = ("What is the capital of Kenya?", "Who painted the Mona Lisa?", "What do giant pandas eat?",
             "Which river flows through Budapest?", "Who invented the telephone?")
TARGET_ASK_S = 8.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="passes over the questions")
    ap.add_argument("--out", default="selfrag_smollm2_cpu_ask.json")
    args = ap.parse_args(argv)

    import torch

    from engine import LLM
    from selfrag import SelfRAG
    from selfrag.retrievers import REALFACTS_CORPUS, BM25Retriever
    from selfrag.smollm2 import selfrag_smollm2_dir

    path = selfrag_smollm2_dir()
    t = time.perf_counter()
    retriever = BM25Retriever(REALFACTS_CORPUS)
    index_s = time.perf_counter() - t
    rags, load_s = {}, {}
    for name, quant in (("fp32", None), ("int8", "int8")):
        t = time.perf_counter()
        llm = LLM(path, device="cpu", dtype="float32", quantization=quant, show_progress=False,
                  enable_prefix_caching=False)
        load_s[name] = time.perf_counter() - t
        rags[name] = SelfRAG(llm, retriever)
        rags[name].answer(QUESTIONS[0], k=5, mode="adaptive", max_tokens=48)          # warm-up
    rows = {name: [] for name in rags}
    for _ in range(args.rounds):
        for q in QUESTIONS:
            for name, rag in rags.items():                                              # alternating
                t0 = time.perf_counter()
                passages = retriever.retrieve(q, 5)
                t1 = time.perf_counter()
                rag.answer(q, passages=passages, mode="adaptive", max_tokens=1)
                t2 = time.perf_counter()
                result = rag.answer(q, passages=passages, mode="adaptive", max_tokens=48)
                t3 = time.perf_counter()
                tokens = max((len(c.token_ids) for c in result.candidates), default=0)
                rows[name].append({"question": q, "retrieval_s": t1 - t0, "prefill_s": t2 - t1,
                                   "answer_s": t3 - t2, "decode_s": max(0.0, (t3 - t2) - (t2 - t1)),
                                   "tokens": tokens, "retrieved": result.retrieved, "answer": result.answer})
    summary = {}
    for name, rs in rows.items():
        med = {k: round(statistics.median(r[k] for r in rs), 3) for k in ("retrieval_s", "prefill_s", "decode_s",
                                                                          "answer_s")}
        med["ask_warm_s"] = round(med["retrieval_s"] + med["answer_s"], 3)
        summary[name] = {"load_s": round(load_s[name], 2), **med,
                         "max_answer_tokens": max(r["tokens"] for r in rs)}
        print(f"{name}: load {summary[name]['load_s']:.2f} s; warm ask {med['ask_warm_s']:.2f} s = retrieval "
              f"{med['retrieval_s']:.3f} + prefill {med['prefill_s']:.2f} + decode {med['decode_s']:.2f} "
              f"(medians of {len(rs)})", flush=True)
    payload = record(model=path, threads=torch.get_num_threads(), index_build_s=round(index_s, 2),
                     questions=list(QUESTIONS), rounds=args.rounds, summary=summary,
                     target_ask_warm_s=TARGET_ASK_S, met=summary["fp32"]["ask_warm_s"] <= TARGET_ASK_S,
                     samples=rows["fp32"][:len(QUESTIONS)],
                     method="medians over questions x rounds; fp32 and int8 alternate per question; prefix "
                            "cache off (every answer prefills everything); prefill = the same answer with "
                            "max_tokens=1 (decision + 5 passages' prefill + 1 token), decode = the rest")
    for p in write_json(args.out, payload, to_out=False):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
