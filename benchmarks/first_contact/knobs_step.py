"""First-contact step ``knobs``: the sampler with every sampling knob on 64 rows of the 7B
vocabulary vs a plain batch, on the device (benchmarks/bench_sampling_knobs.py's paired
timing). Target: knobs <= 1.3x plain. Skipped by the runner when the window is short."""
from __future__ import annotations


def knobs(ctx) -> dict:
    import torch

    from benchmarks.bench_sampling_knobs import GREEDY_KNOBS, compare
    from engine.sampling_params import SamplingParams
    from kernels import ops as kernel_ops
    dev = torch.device(ctx.device)
    rows, vocab = (8, 512) if ctx.dry else (64, 32016)
    ops = kernel_ops.get_ops("auto", dev.type)
    gen = torch.Generator().manual_seed(0)
    plain, knobbed, ratio = compare(dev, rows, vocab, SamplingParams(temperature=0, max_tokens=100),
                                    SamplingParams(temperature=0, max_tokens=100, **GREEDY_KNOBS),
                                    ops, ctx.sync, 6 if ctx.dry else 60, gen)
    ctx.log(f"   sampler, {rows} rows: plain {plain * 1e3:.3f} ms, all knobs {knobbed * 1e3:.3f} ms "
            f"(median paired ratio {ratio:.2f}x, target <= 1.3x)")
    return dict(rows=rows, vocab=vocab, plain_ms=plain * 1e3, knobs_ms=knobbed * 1e3,
                ratio=ratio, target_le_1_3=ratio <= 1.3)
