"""First-contact step ``int8``: one int8 7B engine (``quantization="int8"``, the shared
fp16 dummy weights' draw quantized at load) against the shared fp16 engine, batch-1
decode, in the same run. The fp16 engine is timed first, then freed (its KV pool holds
most of the GPU); the int8 engine is built with 16 sequences at most (few graphs to
capture) to stay near 90 s. Target (issue 19): int8 batch-1 tokens/s >= 1.6x fp16's.
With more than 60 s left on an sm_89+ GPU (or in the dry run), an fp8 engine is timed
the same way after it."""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.first_contact.verify_step import timed_steps


def _tpot(ctx, llm, prompt, new):
    """(median seconds of a decode step, the generated tokens) of one greedy request."""
    times, outs = timed_steps(ctx, llm, [prompt], new)
    return statistics.median(times), list(next(iter(outs.values())).outputs[0].token_ids)


def int8(ctx) -> dict:
    from benchmarks.first_contact.engine_steps import rand_prompts, sizes
    S = sizes(ctx.dry)
    new = 8 if ctx.dry else 64
    fp = ctx.shared["llm"]
    V = fp.config.vocab_size
    warm, prompt = rand_prompts(2, S["prompt"], V, seed=90)
    _tpot(ctx, fp, warm, new)                                           # warm-up, same shapes
    t16, tok16 = _tpot(ctx, fp, prompt, new)
    W16, model_dir = fp.model.num_bytes(), fp.model_dir
    del fp                       # this step's reference: new_engine frees the shared one
    kw = dict(dtype="float32", device="cpu", kernel_backend="torch") if ctx.dry else \
        dict(dtype="float16", device="cuda")

    def timed_engine(quantization):
        """(median decode step, its tokens, build seconds, the engine) of a fresh 8-bit
        engine, built after every earlier one is freed (it sizes its KV pool from what is
        free then)."""
        t = time.perf_counter()
        llm = ctx.new_engine(model_dir, load_format="dummy", max_num_seqs=2 if ctx.dry else 16,
                             skip_tokenizer_init=True, show_progress=False, quantization=quantization, **kw)
        build_s = time.perf_counter() - t
        _tpot(ctx, llm, warm, new)                                      # warm-up, same shapes
        return (*_tpot(ctx, llm, prompt, new), build_s, llm)
    t8, tok8, build_s, q8 = timed_engine("int8")
    same = next((i for i, (a, b) in enumerate(zip(tok16, tok8)) if a != b), min(len(tok16), len(tok8)))
    out = dict(fp16_tpot_ms=t16 * 1e3, int8_tpot_ms=t8 * 1e3, fp16_tokens_per_s=1 / t16, int8_tokens_per_s=1 / t8,
               speedup=t16 / t8, fp16_weight_bytes=W16, int8_weight_bytes=q8.model.num_bytes(),
               int8_build_s=build_s, cuda_graphs=q8.cuda_graphs, leading_tokens_equal_to_fp16=same,
               target_speedup_ge_1_6=t16 / t8 >= 1.6)
    ctx.log(f"   batch 1: fp16 {t16 * 1e3:.2f} ms/token, int8 {t8 * 1e3:.2f} ms/token ({t16 / t8:.2f}x; "
            f"weights {W16 / 1e9:.2f} -> {out['int8_weight_bytes'] / 1e9:.2f} GB), built in {build_s:.1f} s, "
            f"first {same} greedy tokens equal to fp16's")
    del q8                        # freed before the fp8 engine sizes its pool
    if ctx.dry or (ctx.cuda and torch.cuda.get_device_capability() >= (8, 9) and ctx.left() > 60):
        tf8, _, _, f8 = timed_engine("fp8")
        del f8
        out.update(fp8_tpot_ms=tf8 * 1e3, fp8_tokens_per_s=1 / tf8, fp8_speedup=t16 / tf8)
        ctx.log(f"   batch 1: fp8 {tf8 * 1e3:.2f} ms/token ({t16 / tf8:.2f}x fp16)")
    return dict(out, failures=[])
