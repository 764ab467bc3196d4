"""Peak KV blocks and time of n samples of one prompt vs n separate requests, and of
LLM.score vs a separate request per continuation.

    python benchmarks/bench_n_samples.py [--n 8] [--prompt-len 1024] [--new 64] [--model DIR]

``SamplingParams(n=8)`` prefills the prompt once and forks the samples off it (shared
full blocks); the baseline is the same prompt sent as 8 separate requests with prefix
caching off, measured in the same run on the same engine settings. Peak blocks are read
from the block manager after every step. Target: n=8, 1024-token prompt, 64 new tokens
at least 5x fewer peak blocks. Also: prefilled positions of ``score`` with 8
continuations against 8 separate prompt+continuation requests. Writes
benchmarks/results/n_samples_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import device_name, record, slug, write_json  # noqa: E402


def run(llm, prompts_params) -> tuple[int, float]:
    """(peak blocks in use, seconds) to finish the given requests."""
    for prompt, params in prompts_params:
        llm.add_request({"prompt_token_ids": prompt}, params)
    peak, t0 = 0, time.perf_counter()
    while llm.has_unfinished_requests():
        llm.step()
        peak = max(peak, llm.block_manager.get_stats()["used"])
    return peak, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from engine import LLM, SamplingParams
    from selfrag.default_model import default_model_dir
    model = args.model or default_model_dir()

    def engine(caching):
        return LLM(model, device=args.device, show_progress=False, enable_prefix_caching=caching,
                   max_model_len=args.prompt_len + args.new + 16, num_kv_blocks=4096)

    gen = torch.Generator().manual_seed(0)
    vocab = engine(False).config.vocab_size
    prompt = [1] + torch.randint(3, vocab, (args.prompt_len - 1,), generator=gen).tolist()
    sample = dict(temperature=0.8, max_tokens=args.new, ignore_eos=True)
    rows = []
    for label, caching, reqs in (
            (f"n={args.n}", False, [(prompt, SamplingParams(n=args.n, seed=0, **sample))]),
            (f"{args.n} requests, no prefix caching", False,
             [(prompt, SamplingParams(seed=i, **sample)) for i in range(args.n)]),
            (f"{args.n} requests, prefix caching", True,
             [(prompt, SamplingParams(seed=i, **sample)) for i in range(args.n)])):
        llm = engine(caching)
        run(llm, reqs[:1])                                   # warm-up: same shapes
        llm = engine(caching)
        peak, secs = run(llm, reqs)
        rows.append(dict(case=label, peak_blocks=peak, seconds=secs,
                         prefill_positions=llm.scheduler.num_prefill_tokens))
        print(f"{label:36s} peak KV blocks {peak:5d}, prefilled {llm.scheduler.num_prefill_tokens:6d} "
              f"positions, {secs:6.2f} s")
    ratio = rows[1]["peak_blocks"] / rows[0]["peak_blocks"]
    print(f"n={args.n}: {ratio:.2f}x fewer peak blocks than separate requests without prefix caching "
          f"(target >= 5x)")
    conts = [torch.randint(3, vocab, (8 + 4 * i,), generator=gen).tolist() for i in range(args.n)]
    llm = engine(False)
    t0 = time.perf_counter()
    llm.score({"prompt_token_ids": prompt}, conts)
    score_s, score_pos = time.perf_counter() - t0, llm.scheduler.num_prefill_tokens
    llm = engine(False)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt + c} for c in conts],
                 SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)
    sep_s, sep_pos = time.perf_counter() - t0, llm.scheduler.num_prefill_tokens
    print(f"score, {args.n} continuations: {score_pos} positions prefilled in {score_s:.2f} s; separate "
          f"requests: {sep_pos} in {sep_s:.2f} s")
    dname = device_name(args.device)
    write_json(f"n_samples_{slug(dname) if args.device == 'cuda' else 'cpu'}.json",
               record(device=dname, model=os.path.basename(os.path.normpath(model)), n=args.n,
                      prompt_len=args.prompt_len, new_tokens=args.new, rows=rows,
                      peak_block_ratio=ratio, target_ge_5=ratio >= 5,
                      score=dict(positions=score_pos, seconds=score_s, separate_positions=sep_pos,
                                 separate_seconds=sep_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
