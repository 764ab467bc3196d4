"""bench_latency.py's ``hf`` stage: transformers' LlamaForCausalLM on the same device with
the very same weights (copied from the engine, no checkpoint written) and the same
prompts: greedy ``generate`` at batch 1 (dynamic cache), the throughput workload in
left-padded batches, and the static cache (+ torch.compile on CUDA) at batch 1. Each
sub-run's error is recorded, not raised.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time

import torch

from benchmarks.common import record
from benchmarks.latency_engine import throughput_workload


def hf_weights(llm) -> dict:
    """HF-named views of the engine's (fused) weights: nothing is copied."""
    return {name: llm.model._target(name) for name in llm.config.weight_shapes()}


def build_hf(cfg, weights: dict, dtype: torch.dtype, device: str):
    """transformers' LlamaForCausalLM of ``cfg`` on ``device``, holding a copy of ``weights``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hcfg = LlamaConfig.from_dict(cfg.to_hf_dict(4))
    no_init = contextlib.nullcontext()
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            no_init = getattr(__import__(mod, fromlist=["no_init_weights"]), "no_init_weights")()
            break
        except (ImportError, AttributeError):
            pass
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init, torch.device(device):
            hf = LlamaForCausalLM(hcfg)
    finally:
        torch.set_default_dtype(prev)
    hf.load_state_dict(weights, strict=True)
    return hf.eval()     # no .to(dtype): it would also cast the fp32 RoPE inv_freq buffer


def hf_generate(hf, ids, mask, n, sync, **kw):
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, **kw)
    sync()
    return out[:, ids.shape[1]:], time.perf_counter() - t


def hf_latency(hf, prompt, n, device, sync, static: bool):
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)
    kw = dict(cache_implementation="static") if static else {}
    t = time.perf_counter()
    # Warm-up. Static: the full length, so that the timed run finds its cache
    # shape and compiled decode step ready (the 1-token run has no decode step).
    hf_generate(hf, ids, mask, n if static else min(4, n), sync, **kw)
    warm_s = time.perf_counter() - t
    toks, tn = hf_generate(hf, ids, mask, n, sync, **kw)
    _, t1 = hf_generate(hf, ids, mask, 1, sync, **kw)
    tpot = (tn - t1) / max(n - 1, 1)
    return dict(ttft_s=t1, tpot_s=tpot, e2e_s=tn, warmup_s=warm_s, tokens=toks[0].tolist())


def hf_throughput(hf, P, vocab, device, sync, budget, reserve, k_engine, tpot_s=None):
    prompts, outs = throughput_workload(P, vocab, k_engine)
    k = min(len(prompts), P["hf_requests"])
    B = P["hf_batch"]
    useful = generated = 0
    secs = 0.0
    done = 0
    notes = []
    # Before the first batch: its longest output at twice HF's batch-1 step time.
    last = 2 * max(outs[:B]) * tpot_s if tpot_s else None
    for i in range(0, k, B):
        if last is not None and last * 1.2 > budget.left() - reserve:
            notes.append(f"hf throughput: stopped after {done} of {k} requests "
                         f"({budget.left():.0f} s left, a batch takes ~{last:.0f} s)")
            break
        ps, os_ = prompts[i:i + B], outs[i:i + B]
        L = max(map(len, ps))
        ids = torch.tensor([[0] * (L - len(p)) + p for p in ps], device=device)    # left padding
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps], device=device)
        n = max(os_)
        _, dt = hf_generate(hf, ids, mask, n, sync)
        last = dt
        secs += dt
        useful += sum(os_)
        generated += n * len(ps)
        done += len(ps)
    return dict(requests=done, requests_planned=k, seconds=secs, useful_tokens=useful,
                generated_tokens=generated, inputs=sum(len(p) for p in prompts[:done]),
                outs=outs[:done]), notes


def engine_to_hf(llm_holder, dev: str):
    """Frees the engine (its KV pool) and builds HF with a copy of its weights. Returns HF and the config."""
    llm = llm_holder.pop("llm")
    cfg, dtype = llm.config, llm.model.dtype
    weights = hf_weights(llm)
    del llm
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    t = time.perf_counter()
    hf = build_hf(cfg, weights, dtype, dev)
    del weights
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"  HF model built in {time.perf_counter() - t:.1f} s", flush=True)
    return hf, cfg


def lat_record(r, stage, hbase, prompt, n, eng_tokens, eng_lat, **extra):
    """A batch-1 HF run's record (``hf_latency``'s result), against the engine's tokens and latency."""
    same = 0
    for a, b in zip(r["tokens"], eng_tokens):
        if a != b:
            break
        same += 1
    rec = record(**hbase, batch_size=1, prompt_len=len(prompt), output_len=n, stage=stage,
                 ttft_ms=r["ttft_s"] * 1e3, tpot_ms=r["tpot_s"] * 1e3,
                 decode_tokens_per_s=1 / r["tpot_s"], e2e_latency_ms=r["e2e_s"] * 1e3,
                 warmup_s=r["warmup_s"], leading_tokens_equal_to_engine=same, **extra)
    if eng_lat:
        rec["speedup_vs_hf"] = dict(tpot=r["tpot_s"] * 1e3 / eng_lat["tpot_ms"],
                                    ttft=r["ttft_s"] * 1e3 / eng_lat["ttft_ms"],
                                    e2e=r["e2e_s"] * 1e3 / eng_lat["e2e_latency_ms"])
    print(f"  {stage}: TTFT {rec['ttft_ms']:.1f} ms, TPOT {rec['tpot_ms']:.2f} ms"
          + (f", engine speedup (TPOT) {rec['speedup_vs_hf']['tpot']:.2f}x" if eng_lat else ""),
          flush=True)
    return rec


def throughput_record(r, P, hbase, eng_tp):
    """The record of ``hf_throughput``'s result, against the engine's throughput record."""
    rec = record(**hbase, batch_size=P["hf_batch"],
                 prompt_len=round(r["inputs"] / r["requests"]),
                 output_len=round(statistics.mean(r["outs"])), stage="hf_throughput",
                 num_requests=r["requests"], num_requests_planned=r["requests_planned"],
                 padding="left, pad_token_id 0, batches in arrival order; each batch "
                         "generates its longest output length",
                 output_tokens=r["useful_tokens"], generated_tokens=r["generated_tokens"],
                 output_tokens_per_s=r["useful_tokens"] / r["seconds"],
                 generated_tokens_per_s=r["generated_tokens"] / r["seconds"],
                 seconds=r["seconds"])
    if eng_tp:
        rec["speedup_vs_hf"] = eng_tp["output_tokens_per_s"] / rec["output_tokens_per_s"]
    return rec


def stage_hf(llm_holder, P, base, sync, budget, eng_lat, eng_tp, prompt, eng_tokens, emit):
    """Frees the engine (its KV pool), copies its weights into HF, runs the peer.
    ``emit(record)`` stores each result as soon as it exists."""
    dev = P["device"]
    hf, cfg = engine_to_hf(llm_holder, dev)
    notes, errors = [], {}
    import transformers
    hbase = dict(base, engine="hf", transformers_version=transformers.__version__)
    n = P["output_len"]
    tpot_hf = None
    try:
        r = hf_latency(hf, prompt, n, dev, sync, static=False)
        tpot_hf = r["tpot_s"]
        emit(lat_record(r, "hf_latency", hbase, prompt, n, eng_tokens, eng_lat, cache="dynamic (default)",
                        compiled=False))
    except Exception as e:  # noqa: BLE001
        errors["hf_latency"] = f"{type(e).__name__}: {e}"
    # Throughput: as many padded batches as fit, leaving room for the static run.
    try:
        reserve = P["static_need"] if budget.left() > 2 * P["static_need"] else 0
        k_engine = eng_tp["num_requests"] if eng_tp else P["num_requests"]
        r, more = hf_throughput(hf, P, cfg.vocab_size, dev, sync, budget, reserve, k_engine,
                                tpot_hf)
        notes += more
        if r["requests"]:
            rec = throughput_record(r, P, hbase, eng_tp)
            emit(rec)
            print(f"  hf_throughput: {r['requests']} requests, {rec['output_tokens_per_s']:.1f} "
                  f"output tok/s" + (f", engine speedup {rec['speedup_vs_hf']:.2f}x" if eng_tp else ""),
                  flush=True)
    except Exception as e:  # noqa: BLE001
        errors["hf_throughput"] = f"{type(e).__name__}: {e}"
    # Static cache (+ torch.compile of the decode step, automatic on CUDA).
    if P.get("skip_hf_static"):
        notes.append("hf static cache skipped (--skip-hf-static)")
    elif budget.left() < P["static_need"]:
        notes.append(f"hf static cache skipped: {budget.left():.0f} s left, needs ~{P['static_need']} s")
    else:
        try:
            compiled = dev.startswith("cuda")
            emit(lat_record(hf_latency(hf, prompt, n, dev, sync, static=True),
                            "hf_static_latency", hbase, prompt, n, eng_tokens, eng_lat,
                            cache="static", compiled=compiled,
                            compile_note="generate() compiles the decode forward itself "
                                         "with a static cache on CUDA" if compiled else
                                         "CPU: generate() does not auto-compile; static "
                                         "cache only"))
        except Exception as e:  # noqa: BLE001
            errors["hf_static_latency"] = f"{type(e).__name__}: {str(e)[:2000]}"
    for k, v in errors.items():
        print(f"  {k} FAILED: {v[:300]}", flush=True)
    del hf
    return notes, errors
