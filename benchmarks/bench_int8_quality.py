"""What 8-bit weights (``LLM(..., quantization="int8" | "fp8")``) cost in accuracy, measured
on the CPU reference path against the unquantized fp32 model, in the same run.

    python benchmarks/bench_int8_quality.py [--model DIR] [--texts 128] [--eval 80]

Text: held-out generator output of the miniature Self-RAG model: examples that
``selfrag.training.examples.generate`` writes about ``heldout_world`` (entities never
seen in training), in the training format.

Per variant (``int8`` and ``fp8``: the engine's; ``int8+lm_head``: the engine's int8 plus
an lm_head quantized the same way by this script, to decide whether the engine should):

* teacher-forced top-1 agreement: over each text's first 128 tokens after the prompt,
  the share of positions where the variant's argmax equals fp32's;
* mean KL(fp32 || variant) of the next-token distributions at those positions;
* perplexity over the tokens the model was trained to write (the training loss mask:
  passages excluded), and its change against fp32;
* greedy tokens before the first divergence: 128 tokens from each prompt (EOS
  ignored), the length of the prefix both models generate alike;
* the Self-RAG held-out eval's PopQA ``match`` (adaptive retrieval), first ``--eval``
  questions.

Targets (issue 19): top-1 agreement >= 98%, perplexity within 1%.
Writes benchmarks/results/int8_quality_cpu.json.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import record, write_json  # noqa: E402

CONTINUATION = 128


def held_out_texts(tokenizer, n: int):
    """(ids, labels, prompt length) of n held-out generator examples."""
    from selfrag.prompts import format_prompt
    from selfrag.training.data import encode_example, heldout_world
    from selfrag.training.examples import generate
    out = []
    for ex in generate(heldout_world(0), n, seed=1234):
        ids, labels = encode_example(tokenizer, ex)
        out.append((ids, labels, len(tokenizer.encode(format_prompt(ex["instruction"])))))
    return out


def full_logits(model, ids: list[int]):
    """fp32 logits [T, V] at every position of one sequence (one prefill forward)."""
    import torch

    from engine.worker.kv_sizing import Layout, build_dummy_batch
    batch = build_dummy_batch(model, Layout(True, (len(ids),), (len(ids),)), 16)
    hidden = model.forward(torch.tensor(ids, device=model.device), batch.positions, batch.meta,
                           batch.kv_caches)
    return model.compute_logits(hidden)


def quantize_lm_head(model) -> None:
    """model.lm_head replaced by its int8 round trip (per row, the engine's format)."""
    import torch

    from kernels import reference
    q = torch.empty(model.lm_head.shape, dtype=torch.int8)
    s = torch.empty(model.lm_head.shape[0])
    reference.quantize_int8(model.lm_head, q, s)
    model.lm_head = (q.float() * s[:, None]).to(model.lm_head.dtype)


def compare(base, other, texts) -> dict:
    import torch
    agree = total = 0
    kl_sum = 0.0
    nll = {"base": 0.0, "other": 0.0}
    n_loss = 0
    with torch.inference_mode():
        for ids, labels, plen in texts:
            a = torch.log_softmax(full_logits(base, ids), -1)
            b = torch.log_softmax(full_logits(other, ids), -1)
            # position t predicts token t + 1
            lo, hi = plen - 1, min(len(ids) - 1, plen - 1 + CONTINUATION)
            agree += int((a[lo:hi].argmax(-1) == b[lo:hi].argmax(-1)).sum())
            total += hi - lo
            kl_sum += float((a[lo:hi].exp() * (a[lo:hi] - b[lo:hi])).sum())
            target = torch.tensor(ids[1:])
            mask = torch.tensor([lab != -100 for lab in labels[1:]])
            for key, lp in (("base", a), ("other", b)):
                nll[key] -= float(lp[:-1].gather(1, target[:, None])[:, 0][mask].sum())
            n_loss += int(mask.sum())
    ppl_base, ppl = math.exp(nll["base"] / n_loss), math.exp(nll["other"] / n_loss)
    return dict(top1_agreement=agree / total, positions=total, mean_kl=kl_sum / total,
                perplexity_fp32=ppl_base, perplexity=ppl, perplexity_change=ppl / ppl_base - 1,
                loss_tokens=n_loss)


def greedy_prefix(base_llm, other_llm, texts) -> dict:
    from engine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=CONTINUATION, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids[:plen]} for ids, _, plen in texts]
    a = base_llm.generate(prompts, params, use_tqdm=False)
    b = other_llm.generate(prompts, params, use_tqdm=False)
    same = []
    for x, y in zip(a, b):
        s, t = x.outputs[0].token_ids, y.outputs[0].token_ids
        n = next((i for i, (u, v) in enumerate(zip(s, t)) if u != v), min(len(s), len(t)))
        same.append(n)
    same.sort()
    return dict(greedy_prefix_mean=sum(same) / len(same), greedy_prefix_median=same[len(same) // 2],
                greedy_identical=sum(n == CONTINUATION for n in same) / len(same))


def popqa_match(llm, n: int) -> float:
    from selfrag import SelfRAG
    from selfrag.evaluate import evaluate, load_eval_file
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "heldout", "popqa_heldout.jsonl")
    recs = load_eval_file(path, "popqa")[:n]
    return evaluate(SelfRAG(llm), recs, "popqa", batch_size=8, progress=False, mode="adaptive")["match"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--eval", type=int, default=80, help="PopQA held-out questions for match")
    args = ap.parse_args(argv)
    from engine import LLM
    from selfrag.default_model import default_model_dir
    path = args.model or default_model_dir()
    t0 = time.perf_counter()
    fp = LLM(path, device="cpu", dtype="float32", show_progress=False)
    q8 = LLM(path, device="cpu", dtype="float32", show_progress=False, quantization="int8")
    q8h = LLM(path, device="cpu", dtype="float32", show_progress=False, quantization="int8")
    f8 = LLM(path, device="cpu", dtype="float32", show_progress=False, quantization="fp8")
    quantize_lm_head(q8h.model)
    texts = held_out_texts(fp.tokenizer, args.texts)
    match_fp = popqa_match(fp, args.eval)
    rows = []
    for name, llm in (("int8", q8), ("fp8", f8), ("int8+lm_head", q8h)):
        row = dict(variant=name, **compare(fp.model, llm.model, texts), **greedy_prefix(fp, llm, texts),
                   popqa_match=popqa_match(llm, args.eval), popqa_match_fp32=match_fp,
                   weight_bytes=llm.model.num_bytes(), weight_bytes_fp32=fp.model.num_bytes())
        row["targets_met"] = dict(top1=row["top1_agreement"] >= 0.98, perplexity=abs(row["perplexity_change"]) <= 0.01)
        rows.append(row)
        print(f"{name:13s} top-1 {row['top1_agreement']:.4f} over {row['positions']} positions, "
              f"KL {row['mean_kl']:.2e}, ppl {row['perplexity_fp32']:.4f} -> {row['perplexity']:.4f} "
              f"({100 * row['perplexity_change']:+.2f}%), greedy prefix mean {row['greedy_prefix_mean']:.1f} "
              f"median {row['greedy_prefix_median']} (identical {row['greedy_identical']:.0%}), "
              f"PopQA match {match_fp:.3f} -> {row['popqa_match']:.3f}", flush=True)
    for p in write_json("int8_quality_cpu.json", record(
            device="cpu", model=os.path.basename(os.path.normpath(path)), texts=len(texts),
            continuation=CONTINUATION, eval_questions=args.eval, rows=rows,
            seconds=round(time.perf_counter() - t0, 1))):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
