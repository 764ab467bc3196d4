"""First-contact step ``knobs``: the sampler with every sampling knob on 64 rows of the 7B
vocabulary vs a plain batch, on the device (benchmarks/bench_sampling_knobs.py's timing).
Target: knobs <= 1.3x plain. Skipped by the runner when the window is short."""
from __future__ import annotations


def knobs(ctx) -> dict:
    import torch

    from benchmarks.bench_sampling_knobs import make_seqs, time_sampler
    from engine.sampler import Sampler
    from engine.sampling_params import SamplingParams
    from kernels import ops as kernel_ops
    dev = torch.device(ctx.device)
    rows, vocab = (8, 512) if ctx.dry else (64, 32016)
    ops = kernel_ops.get_ops("auto", dev.type)
    gen = torch.Generator().manual_seed(0)
    logits_sets = [torch.randn(rows, vocab, generator=gen).to(dev) * 3 for _ in range(4)]
    extra = dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3, min_tokens=60,
                 logit_bias={t: 2.0 for t in range(100, 108)})
    out = {}
    for label, p in (("plain", SamplingParams(temperature=0, max_tokens=100)),
                     ("knobs", SamplingParams(temperature=0, max_tokens=100, **extra))):
        if label == "knobs":
            p.bad_words_token_ids = [[5, 6], [7], [9, 10, 11]]
        sampler = Sampler(dev, 0)
        sampler.eos_token_id = 2
        out[label] = time_sampler(sampler, logits_sets, make_seqs(rows, vocab, p, gen), ops, ctx.sync,
                                  5 if ctx.dry else 30)
    ratio = out["knobs"] / out["plain"]
    ctx.log(f"   sampler, {rows} rows: plain {out['plain'] * 1e3:.3f} ms, all knobs {out['knobs'] * 1e3:.3f} ms "
            f"({ratio:.2f}x, target <= 1.3x)")
    return dict(rows=rows, vocab=vocab, plain_ms=out["plain"] * 1e3, knobs_ms=out["knobs"] * 1e3,
                ratio=ratio, target_le_1_3=ratio <= 1.3)
