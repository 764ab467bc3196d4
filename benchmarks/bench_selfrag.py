"""Short-form Self-RAG cost vs a plain batch of the same shape.

One question, 10 passages of about 150 tokens, up to 100 new tokens per branch
(greedy). Measured in one run, on the same engine:

  plain      10 independent generations of the same prompts and output lengths,
             prefix caching off (every branch prefills the whole prompt);
  shared     the same 10 requests with prefix caching (the question prompt is
             prefilled once);
  selfrag    SelfRAG.answer(mode="always"): shared prefix + reflection-token
             grammar + 12 reflection log-probs per step + scoring;
  released   the released pipeline's approach on our engine: the same branches,
             but a full-vocabulary log-prob transfer per token (logprobs=V).

Targets (issue): shared <= 1.0x plain; selfrag <= 1.3x plain.

    python benchmarks/bench_selfrag.py [--model DIR] [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import device_name, record, write_json  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from selfrag import Passage, SelfRAG  # noqa: E402
from selfrag.prompts import format_passage, format_prompt  # noqa: E402

QUESTION = "Can you tell me the difference between llamas and alpacas?"


def passages(tokenizer, n: int, target_tokens: int) -> list[Passage]:
    from importlib.resources import files
    words = files("selfrag").joinpath("data/corpus.txt").read_text().split()
    out = []
    for i in range(n):
        start = (i * 977) % max(1, len(words) - 400)
        text, k = "", 20
        while len(tokenizer.encode(text, add_special_tokens=False)) < target_tokens:
            text = " ".join(words[start:start + k])
            k += 10
        out.append(Passage(f"Passage {i}", text))
    return out


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.model is None:
        from selfrag.default_model import default_model_dir
        args.model = default_model_dir()
    max_tokens = 20 if args.quick else 100
    repeat = 1 if args.quick else args.repeat
    # Two engines live at once: each takes under half of the GPU's memory.
    shared_llm = LLM(args.model, device=args.device, show_progress=False, gpu_memory_utilization=0.4)
    plain_llm = LLM(args.model, device=args.device, show_progress=False, enable_prefix_caching=False,
                    gpu_memory_utilization=0.8)
    dev = shared_llm.model.device
    import torch
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tok = shared_llm.get_tokenizer()
    ps = passages(tok, 10, 150)
    prompt = format_prompt(QUESTION)
    prompts = [tok.encode(prompt + format_passage(p)) for p in ps]
    rag = SelfRAG(shared_llm)

    def run_selfrag():
        shared_llm.block_manager.reset_prefix_cache()
        return rag.answer(QUESTION, passages=ps, mode="always", max_tokens=max_tokens)

    res = run_selfrag()                                     # warm-up, and the output lengths
    lengths = [len(c.token_ids) for c in res.candidates]
    fixed = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    V = shared_llm.config.vocab_size
    released = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=V,
                               skip_special_tokens=False) for n in lengths]
    reqs = [{"prompt_token_ids": p} for p in prompts]

    def gen(llm, params):
        def f():
            llm.block_manager.reset_prefix_cache()
            return llm.generate(reqs, params, use_tqdm=False)
        return f

    cases = {"plain": gen(plain_llm, fixed), "shared": gen(shared_llm, fixed),
             "selfrag": run_selfrag, "released": gen(shared_llm, released)}
    best = {k: float("inf") for k in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            best[name] = min(best[name], timed(fn, sync)[1])
    n_prompt = sum(len(p) for p in prompts)
    print(f"model {args.model} on {device_name(dev.type)}: 10 branches, prompt tokens "
          f"{n_prompt} ({len(tok.encode(prompt))} shared), generated {sum(lengths)}")
    for name, t in best.items():
        print(f"  {name:9s} {t * 1e3:9.1f} ms  {t / best['plain']:5.2f}x plain")
    write_json("selfrag_shortform.json" if not args.quick else "selfrag_shortform_quick.json",
               record(device=device_name(dev.type), dtype=str(shared_llm.model.dtype).replace("torch.", ""),
                      batch_size=10, prompt_len=n_prompt // 10, output_len=max_tokens,
                      generated_tokens=sum(lengths),
                      ms={k: v * 1e3 for k, v in best.items()},
                      ratio_vs_plain={k: v / best["plain"] for k, v in best.items()}))


if __name__ == "__main__":
    main()
