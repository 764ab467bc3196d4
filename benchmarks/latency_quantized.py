"""bench_latency.py's ``quantized`` stage (``--quantization int8`` or ``fp8``): 8-bit
weights side by side with the model dtype, in the same run, on the same dummy weights
(the 8-bit engine's are the fp16 draw quantized: engine/model/quantized_weights.py).

Decode at batch 1 and 16 (prompt ``prompt_len``, ``sweep_output_len`` new tokens, after
a warm-up at the same shapes), first on the run's engine, then (once that engine is
freed: each takes most of the GPU for its KV pool) on an 8-bit engine built the same
way. Per engine and batch: TPOT, decode tokens/s, bytes per decode step (its own
``num_bytes()`` + the KV cache read) and the effective bandwidth, as a fraction of the
copy bandwidth. Ratios: 8-bit tokens/s over the model dtype's (int8 target 1.6x at batch 1 on
the 7B shape, issue 19).
"""
from __future__ import annotations

import gc
import time

BATCHES = (1, 16)


def _decode(llm, P, b, sync, run_steps, rand_prompts):
    vocab = llm.config.vocab_size
    run_steps(llm, rand_prompts(b, P["prompt_len"], vocab, seed=700 + b), 2, sync)      # warm-up
    r = run_steps(llm, rand_prompts(b, P["prompt_len"], vocab, seed=800 + b), P["sweep_output_len"], sync)
    decode_s = r["t_end"] - r["t_all"]
    return decode_s / max(r["decode_steps"], 1), b * r["decode_steps"] / decode_s


def stage_quantized(holder, build, quantization, P, base, bw, kvt, sync, helpers) -> list[dict]:
    """holder["llm"]: the run's engine (freed here); build(quantization) -> a new engine;
    helpers: bench_latency's (run_steps, rand_prompts, decode_bytes_per_step, record)."""
    run_steps, rand_prompts, decode_bytes_per_step, record = helpers
    rows, tps = [], {}
    mean_ctx = P["prompt_len"] + P["sweep_output_len"] / 2
    for quant in (None, quantization):
        if quant is not None:
            holder.pop("llm", None)
            gc.collect()
            try:
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:
                pass
            t = time.perf_counter()
            holder["llm"] = build(quant)
            build_s = time.perf_counter() - t
        elif "llm" not in holder:               # the hf stage freed it
            t = time.perf_counter()
            holder["llm"] = build(None)
            build_s = time.perf_counter() - t
        else:
            build_s = None
        llm = holder["llm"]
        W = llm.model.num_bytes()
        name = quant or str(llm.model.dtype).replace("torch.", "")
        for b in BATCHES:
            tpot, tok_s = _decode(llm, P, b, sync, run_steps, rand_prompts)
            step_bytes = decode_bytes_per_step(W, kvt, b, mean_ctx)
            tps[(name, b)] = tok_s
            rows.append(record(**base, stage="quantized", weights=name, batch_size=b, prompt_len=P["prompt_len"],
                               output_len=P["sweep_output_len"], tpot_ms=tpot * 1e3, decode_tokens_per_s=tok_s,
                               weight_bytes=W, bytes_per_decode_step=step_bytes,
                               achieved_bytes_per_s=step_bytes / tpot,
                               bandwidth_fraction=step_bytes / tpot / bw, engine_build_s=build_s))
            print(f"  quantized stage: {name:8s} batch {b:3d}: {tpot * 1e3:8.2f} ms/token {tok_s:9.1f} tok/s, "
                  f"{step_bytes / tpot / 1e9:8.1f} GB/s ({step_bytes / tpot / bw:.2f} of copy)", flush=True)
        del llm          # the holder's is the only reference left: the next build frees it first
    base_name = next(n for n, _ in tps if n != quantization)
    for r in rows:
        if r["weights"] == quantization:
            r["speedup_vs_" + base_name] = tps[(quantization, r["batch_size"])] / tps[(base_name, r["batch_size"])]
    return rows
