"""Sampling time with every knob on every row vs a plain batch (the sampler alone).

    python benchmarks/bench_sampling_knobs.py [--rows 64] [--vocab 32016] [--device cpu|cuda]

Random fp32 logits [rows, vocab]; each timed call is one ``Sampler.launch(...).wait()``
(the step's device->host read included), the same batch of sequences every step, as in
decode, after warm-up calls with the same shapes. Three batches: plain greedy; greedy
with repetition/presence/frequency penalties, logit_bias (8 ids), min_tokens and
bad_words (3 sequences) on every row; the same knobs with sampling (temperature 0.8,
top_p 0.9, min_p 0.05) against plain sampling. Target: knobs <= 1.3x plain.
Writes benchmarks/results/sampling_knobs_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import device_name, record, slug, write_json   # noqa: E402


def make_seqs(rows, vocab, params, gen):
    from engine.sequence import Sequence
    seqs = []
    for i in range(rows):
        prompt = torch.randint(3, vocab, (200,), generator=gen).tolist()
        s = Sequence(prompt, f"r{i}", params)
        s.token_ids += torch.randint(3, vocab, (50,), generator=gen).tolist()     # 50 generated so far
        seqs.append(s)
    return seqs


def time_sampler(sampler, logits_sets, seqs, ops, sync, reps):
    for lg in logits_sets[:3]:                                   # warm-up, same shapes
        sampler.launch(lg, seqs, ops).wait()
    out = []
    for r in range(reps):
        lg = logits_sets[r % len(logits_sets)]
        sync()
        t = time.perf_counter()
        sampler.launch(lg, seqs, ops).wait()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32016)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    from engine.sampler import Sampler
    from engine.sampling_params import SamplingParams
    from kernels import ops as kernel_ops
    dev = torch.device(args.device)
    ops = kernel_ops.get_ops("auto", dev.type)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    logits_sets = [torch.randn(args.rows, args.vocab, generator=gen).to(dev) * 3 for _ in range(4)]
    knobs = dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, min_tokens=60,
                 logit_bias={t: 2.0 for t in range(100, 108)})
    cases = {
        "greedy": (SamplingParams(temperature=0, max_tokens=100),
                   SamplingParams(temperature=0, max_tokens=100, **knobs)),
        "sampled": (SamplingParams(temperature=0.8, top_p=0.9, max_tokens=100, seed=1),
                    SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, max_tokens=100, seed=1, **knobs)),
    }
    rows = []
    for name, (plain_p, knob_p) in cases.items():
        knob_p.bad_words_token_ids = [[5, 6], [7], [9, 10, 11]]        # as the engine fills it in
        res = {}
        for label, p in (("plain", plain_p), ("knobs", knob_p)):
            sampler = Sampler(dev, 0)
            sampler.eos_token_id = 2
            res[label] = time_sampler(sampler, logits_sets, make_seqs(args.rows, args.vocab, p, gen), ops,
                                      sync, args.reps)
        ratio = res["knobs"] / res["plain"]
        rows.append(dict(case=name, plain_ms=res["plain"] * 1e3, knobs_ms=res["knobs"] * 1e3, ratio=ratio,
                         target_le_1_3=ratio <= 1.3))
        print(f"{name:8s} rows {args.rows}: plain {res['plain'] * 1e3:7.2f} ms, all knobs "
              f"{res['knobs'] * 1e3:7.2f} ms per step ({ratio:.2f}x, target <= 1.3x)")
    dname = device_name(args.device)
    write_json(f"sampling_knobs_{slug(dname) if dev.type == 'cuda' else 'cpu'}.json",
               record(device=dname, rows_count=args.rows, vocab=args.vocab, threads=torch.get_num_threads(),
                      rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
