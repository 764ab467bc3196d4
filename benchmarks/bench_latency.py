"""Latency, batch sweep and throughput of the engine against the memory-bandwidth
ceiling and against Hugging Face ``generate``: one run, one device, one JSON.

Stages (``--stages``, default all; the copy bandwidth is always measured):

  copy        device-to-device copy bandwidth of a fp16 buffer (GPU: 1 GiB,
              median of 10, read + write counted): the ceiling's denominator;
  latency     batch 1, prompt 128, 256 new tokens (ignore_eos), dummy weights
              of the selfrag-7b shape in fp16. Step API: TTFT = add_request ->
              the step that returns the first token; TPOT = mean time per
              token after the first; decode tokens/s = 1 / TPOT; bandwidth
              fraction = (bytes read per decode step / TPOT) / copy bandwidth,
              where bytes = llm.model.num_bytes() (every weight, embedding
              table included) + the KV cache read at the mean context; and the
              engine's host time per decode step (schedule + prepare + launch +
              sample + output from llm.step_times; device time excluded);
              TTFT is read from the engine's generated-token count and every
              timed run follows a warm-up at its exact shapes with other tokens;
  sweep       batch 1, 4, 16, 64, 256 at prompt 128, 128 new tokens: per-token
              latency (mean decode step) and tokens/s, next to the ceiling
              b x copy bandwidth / weight bytes (and the same with KV reads);
  throughput  256 requests, seeded random prompt and output lengths in
              [100, 1024], ignore_eos, all arriving at once (llm.generate):
              output tokens/s;
  hf          transformers LlamaForCausalLM on the same device with the very
              same weights (copied from the engine, no checkpoint written) and
              the same prompts: greedy generate(min_new_tokens=max_new_tokens)
              at batch 1 (TTFT = generate of 1 token; TPOT from the full run),
              the throughput workload in left-padded batches, and the static
              cache + torch.compile (cache_implementation="static") at batch 1;
              errors are recorded, not raised. Ratios: speedup_vs_hf.
  quantized   only with ``--quantization int8|fp8`` (benchmarks/latency_quantized.py):
              decode at batch 1 and 16 on the run's engine, then on an 8-bit engine of
              the same dummy weights; tok/s, effective bandwidth, the 8-bit speedup.

Profiles: CUDA present -> the 7B shape in fp16 (the sizes above); no CUDA ->
the embedded default model's shape in fp32 on CPU (``--quick``: smaller);
``--dry-run`` -> a tiny config on CPU, a few tokens (the same code paths).
``--max-seconds`` (default 540) is a budget: parts that would not fit are
shrunk or skipped with a note, and the JSON is rewritten after every stage.

Writes benchmarks/results/latency_<device>.json (``--quick``: ..._quick.json,
``--dry-run``: latency_dryrun.json; also into $OUT when set) and a PNG of
tokens/s against batch size with the bandwidth ceiling (beside the JSON; for
``--quick``/``--dry-run`` into $OUT or the temp dir, as git ignores only their JSON).

    python benchmarks/bench_latency.py [--quick | --dry-run] [--stages latency,sweep,throughput,hf]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

_T0 = time.perf_counter()      # the budget starts before torch is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import device_name, record, slug, write_json  # noqa: E402

STAGES = ("latency", "sweep", "throughput", "hf", "quantized")   # quantized: only with --quantization

# A tiny GQA config for the dry run (CPU, fp32).
DRY_CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, model_type="llama")

# Settings per profile. copy_mib: the copy buffer; tp_*: the throughput workload;
# hf_batch: HF's padded batch size; need: seconds a stage needs at least to be
# started (the budget check); static_need: same for HF's static-cache compile.
PROFILES = {
    "gpu": dict(model="selfrag-7b", device="cuda", dtype="float16", copy_mib=1024, copy_repeat=10,
                prompt_len=128, output_len=256, batch_sizes=[1, 4, 16, 64, 256], sweep_output_len=128,
                num_requests=256, tp_in=(100, 1024), tp_out=(100, 1024), hf_batch=32,
                hf_requests=256, need=dict(latency=20, sweep=30, throughput=40, hf=45, quantized=60),
                static_need=150),
    "gpu_quick": dict(model="selfrag-7b", device="cuda", dtype="float16", copy_mib=1024, copy_repeat=5,
                      prompt_len=128, output_len=128, batch_sizes=[1, 4, 16, 64, 256],
                      sweep_output_len=32, num_requests=64, tp_in=(100, 1024), tp_out=(100, 512),
                      hf_batch=32, hf_requests=32, need=dict(latency=20, sweep=30, throughput=30, hf=45, quantized=60),
                      static_need=150),
    "cpu": dict(model="default", device="cpu", dtype="float32", copy_mib=256, copy_repeat=7,
                prompt_len=128, output_len=64, batch_sizes=[1, 4, 16, 64], sweep_output_len=32,
                num_requests=32, tp_in=(16, 256), tp_out=(16, 128), hf_batch=8, hf_requests=32,
                need=dict(latency=5, sweep=10, throughput=10, hf=15, quantized=10), static_need=15),
    "quick": dict(model="default", device="cpu", dtype="float32", copy_mib=64, copy_repeat=5,
                  prompt_len=64, output_len=32, batch_sizes=[1, 4, 16], sweep_output_len=16,
                  num_requests=16, tp_in=(16, 128), tp_out=(8, 64), hf_batch=8, hf_requests=16,
                  need=dict(latency=2, sweep=5, throughput=5, hf=5, quantized=5), static_need=5),
    "dry": dict(model="dry", device="cpu", dtype="float32", copy_mib=8, copy_repeat=3,
                prompt_len=16, output_len=8, batch_sizes=[1, 4, 16], sweep_output_len=4,
                num_requests=8, tp_in=(8, 32), tp_out=(4, 16), hf_batch=4, hf_requests=8,
                need=dict(latency=1, sweep=1, throughput=1, hf=1, quantized=1), static_need=1),
}


# ---------------------------------------------------------------------------- arithmetic
def kv_bytes_per_token(cfg, elem_bytes: int) -> int:
    """K and V of one token over all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem_bytes


def decode_bytes_per_step(weight_bytes: float, kv_per_token: float, batch: int,
                          mean_context: float) -> float:
    """Bytes one decode step reads: every weight once + each sequence's KV cache."""
    return weight_bytes + batch * mean_context * kv_per_token


def bandwidth_fraction(bytes_per_step: float, step_s: float, copy_bytes_per_s: float) -> float:
    """(bytes read per step / step time) as a fraction of the measured copy bandwidth."""
    return bytes_per_step / step_s / copy_bytes_per_s


def ceiling_tokens_per_s(batch: int, copy_bytes_per_s: float, bytes_per_step: float) -> float:
    """Decode tokens/s if every step only streamed its bytes at copy bandwidth."""
    return batch * copy_bytes_per_s / bytes_per_step


# ---------------------------------------------------------------------------- helpers
class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = _T0, seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def syncer(device: str):
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def rand_prompts(n: int, length, vocab: int, seed: int) -> list[list[int]]:
    """Seeded random prompts (BOS + ids); distinct per call, so prefix caching never hits."""
    g = random.Random(seed)
    lengths = [length] * n if isinstance(length, int) else length
    return [[1] + [g.randrange(3, vocab - 1) for _ in range(L - 1)] for L in lengths]


def copy_bandwidth(device: str, mib: int, repeat: int) -> dict:
    """Median device-to-device copy of a fp16 buffer; bytes/s counting read + write."""
    n = mib * (1 << 20) // 2
    src = torch.ones(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    cuda = device.startswith("cuda")
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(repeat):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    del src, dst
    return dict(buffer_bytes=2 * n, repeats=repeat, copy_seconds_median=med,
                copy_bytes_per_s=2 * 2 * n / med, copy_gb_per_s=2 * 2 * n / med / 1e9,
                bytes_counted="read + write (2 x buffer)")


def model_dir(name: str, tmp: str) -> str:
    if name == "dry":
        path = os.path.join(tmp, "latency-dry-model")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(DRY_CONFIG, f)
        return path
    if name == "default":
        from selfrag.default_model import default_model_dir
        return default_model_dir()
    return name


HOST_NOTE = ("host_ms_per_step = schedule + prepare + launch + sample + output per decode step "
             "(LLM.step_times without wait, the read-back that waits for the device): host work "
             "only, device time excluded")


def host_ms(split: dict) -> float:
    """Host ms of a step from its split (every phase but ``wait``)."""
    return sum(v for k, v in split.items() if k != "wait")


def split_ms(llm, before: dict, steps_before: int) -> tuple[dict, int]:
    steps = llm.num_steps - steps_before
    return ({k: (llm.step_times[k] - before[k]) / max(steps, 1) * 1e3 for k in llm.step_times},
            steps)


def run_steps(llm, prompts, out_len, sync):
    """Queues every prompt at once and steps until done. Returns per-request
    first-token times, the time all had their first token, the end time, the
    decode steps and their host split, and request 0's tokens."""
    from engine import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    sync()
    t0 = time.perf_counter()
    ids = [llm.add_request({"prompt_token_ids": p}, sp) for p in prompts]
    first: dict[str, float] = {}
    counts = dict.fromkeys(ids, 0)
    tokens0 = []
    t_all = None
    before, steps_before = None, 0
    decode_steps = 0
    while llm.has_unfinished_requests():
        outs = llm.step()
        sync()
        t = time.perf_counter()
        is_decode = t_all is not None
        # First tokens from the engine's own count: with async output processing
        # (CUDA) a step's outputs arrive one step late, which would add a step to TTFT.
        for rid in ids:
            if rid not in first and (llm.num_generated_tokens(rid) or 0) > 0:
                first[rid] = t
        for o in outs:
            n = len(o.outputs[0].token_ids)
            if o.request_id not in first and n > 0:      # finished in this step
                first[o.request_id] = t
            counts[o.request_id] = n
            if o.request_id == ids[0]:
                tokens0 = list(o.outputs[0].token_ids)
        if is_decode:
            decode_steps += 1
        elif len(first) == len(ids):
            t_all = t
            before, steps_before = dict(llm.step_times), llm.num_steps
    t_end = time.perf_counter()
    split, _ = split_ms(llm, before, steps_before) if before else ({}, 0)
    return dict(t0=t0, first=[first[i] - t0 for i in ids], t_all=t_all - t0, t_end=t_end - t0,
                decode_steps=decode_steps, split=split, tokens0=tokens0,
                total_tokens=sum(counts.values()))


# ---------------------------------------------------------------------------- engine stages
def stage_latency(llm, P, base, bw, W, kvt, sync):
    prompt = rand_prompts(1, P["prompt_len"], llm.config.vocab_size, seed=1)
    warm = rand_prompts(1, P["prompt_len"], llm.config.vocab_size, seed=2)
    run_steps(llm, warm, P["output_len"], sync)        # warm-up: the timed shapes, other tokens
    r = run_steps(llm, prompt, P["output_len"], sync)
    n = P["output_len"]
    ttft = r["first"][0]
    tpot = (r["t_end"] - r["t_all"]) / max(r["decode_steps"], 1)
    mean_ctx = P["prompt_len"] + n / 2
    step_bytes = decode_bytes_per_step(W, kvt, 1, mean_ctx)
    split = r["split"]
    host = host_ms(split)
    rec = record(**base, batch_size=1, prompt_len=P["prompt_len"], output_len=n, stage="latency",
                 engine="engine", ttft_ms=ttft * 1e3, tpot_ms=tpot * 1e3,
                 decode_tokens_per_s=1 / tpot, e2e_latency_ms=r["t_end"] * 1e3,
                 weight_bytes=W, kv_bytes_read_per_step=step_bytes - W,
                 bytes_per_decode_step=step_bytes,
                 bytes_counted="llm.model.num_bytes() (all weights incl. the embedding table, of "
                               "which a step only gathers rows) + KV cache read at the mean context "
                               "(prompt + output/2)",
                 achieved_bytes_per_s=step_bytes / tpot,
                 bandwidth_fraction=bandwidth_fraction(step_bytes, tpot, bw),
                 ceiling_tokens_per_s=ceiling_tokens_per_s(1, bw, W),
                 host_ms_per_step=host, step_split_ms=split,
                 host_fraction_of_step=host / (tpot * 1e3),
                 host_note=HOST_NOTE,
                 decode_steps=r["decode_steps"])
    return rec, prompt[0], r["tokens0"]


def stage_sweep(llm, P, base, bw, W, kvt, sync, budget, reserve):
    rows, notes = [], []
    vocab = llm.config.vocab_size
    out_len, plen = P["sweep_output_len"], P["prompt_len"]
    last = None
    for i, b in enumerate(P["batch_sizes"]):
        if last is not None:
            est = last[1] * max(1.0, b / last[0]) ** 0.6
            if est > budget.left() - reserve:
                notes.append(f"sweep: batch {b} and larger skipped (estimated {est:.0f} s, "
                             f"{budget.left():.0f} s left, {reserve:.0f} s reserved for later stages)")
                break
        t = time.perf_counter()
        run_steps(llm, rand_prompts(b, plen, vocab, seed=300 + i), 2, sync)   # warm-up: same shapes
        r = run_steps(llm, rand_prompts(b, plen, vocab, seed=100 + i), out_len, sync)
        last = (b, time.perf_counter() - t)
        decode_s = r["t_end"] - r["t_all"]
        tpot = decode_s / max(r["decode_steps"], 1)
        mean_ctx = plen + out_len / 2
        step_bytes = decode_bytes_per_step(W, kvt, b, mean_ctx)
        rows.append(record(**base, batch_size=b, prompt_len=plen, output_len=out_len, stage="sweep",
                           engine="engine", tpot_ms=tpot * 1e3,
                           decode_tokens_per_s=b * r["decode_steps"] / decode_s if decode_s > 0 else None,
                           output_tokens_per_s=r["total_tokens"] / r["t_end"],
                           ttft_ms=statistics.mean(r["first"]) * 1e3,
                           prefill_ms=r["t_all"] * 1e3, e2e_ms=r["t_end"] * 1e3,
                           bytes_per_decode_step=step_bytes,
                           bandwidth_fraction=bandwidth_fraction(step_bytes, tpot, bw),
                           ceiling_tokens_per_s=ceiling_tokens_per_s(b, bw, W),
                           ceiling_with_kv_tokens_per_s=ceiling_tokens_per_s(b, bw, step_bytes),
                           host_ms_per_step=host_ms(r["split"]),
                           step_split_ms=r["split"], decode_steps=r["decode_steps"]))
        print(f"  sweep batch {b:4d}: {rows[-1]['tpot_ms']:8.2f} ms/token  "
              f"{rows[-1]['decode_tokens_per_s']:10.1f} decode tok/s  (ceiling "
              f"{rows[-1]['ceiling_tokens_per_s']:10.1f}, with KV {rows[-1]['ceiling_with_kv_tokens_per_s']:10.1f})",
              flush=True)
    return rows, notes


def throughput_workload(P, vocab: int, n: int | None = None):
    g = random.Random(1234)
    n = n or P["num_requests"]
    # Drawn per request, so the first k requests do not depend on n.
    pairs = [(g.randint(*P["tp_in"]), g.randint(*P["tp_out"])) for _ in range(n)]
    ins, outs = [i for i, _ in pairs], [o for _, o in pairs]
    prompts = rand_prompts(n, ins, vocab, seed=4321)
    return prompts, outs


def stage_throughput(llm, P, base, sync, budget, reserve, est_tps):
    from engine import SamplingParams
    prompts, outs = throughput_workload(P, llm.config.vocab_size)
    notes = []
    k = len(prompts)
    if est_tps:
        # Assume half the best sweep rate (longer contexts than the sweep's).
        est = sum(outs) / (0.5 * est_tps)
        avail = budget.left() - reserve
        if est > avail:
            k = max(1, int(k * avail / est))
            notes.append(f"throughput: {k} of {len(prompts)} requests run (estimated {est:.0f} s "
                         f"for all, {avail:.0f} s available)")
    prompts, outs = prompts[:k], outs[:k]
    sps = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outs]
    pre0 = llm.scheduler.num_preemptions
    before, steps0 = dict(llm.step_times), llm.num_steps
    sync()
    t = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=False)
    sync()
    dt = time.perf_counter() - t
    split, steps = split_ms(llm, before, steps0)
    produced = sum(len(o.outputs[0].token_ids) for o in res)
    rec = record(**base, batch_size=k, prompt_len=round(statistics.mean(len(p) for p in prompts)),
                 output_len=round(statistics.mean(outs)), stage="throughput", engine="engine",
                 num_requests=k, num_requests_planned=P["num_requests"],
                 prompt_len_range=list(P["tp_in"]), output_len_range=list(P["tp_out"]),
                 input_tokens=sum(map(len, prompts)), output_tokens=produced,
                 output_tokens_per_s=produced / dt,
                 total_tokens_per_s=(produced + sum(map(len, prompts))) / dt,
                 requests_per_s=k / dt, seconds=dt, steps=steps, step_split_ms=split,
                 host_ms_per_step=host_ms(split),
                 preemptions=llm.scheduler.num_preemptions - pre0,
                 arrival="all at once", max_num_seqs=llm.max_num_seqs)
    print(f"  throughput: {k} requests, {produced} output tokens in {dt:.1f} s = "
          f"{produced / dt:.1f} output tok/s", flush=True)
    return rec, notes


# ---------------------------------------------------------------------------- HF peer
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


def stage_hf(llm_holder, P, base, sync, budget, eng_lat, eng_tp, prompt, eng_tokens, emit):
    """Frees the engine (its KV pool), copies its weights into HF, runs the peer.
    ``emit(record)`` stores each result as soon as it exists."""
    llm = llm_holder.pop("llm")
    cfg, dev, dtype = llm.config, P["device"], llm.model.dtype
    weights = hf_weights(llm)
    del llm
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    notes, errors = [], {}
    t = time.perf_counter()
    hf = build_hf(cfg, weights, dtype, dev)
    del weights
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"  HF model built in {time.perf_counter() - t:.1f} s", flush=True)
    import transformers
    hbase = dict(base, engine="hf", transformers_version=transformers.__version__)
    n = P["output_len"]

    def lat_record(r, stage, **extra):
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

    tpot_hf = None
    try:
        r = hf_latency(hf, prompt, n, dev, sync, static=False)
        tpot_hf = r["tpot_s"]
        emit(lat_record(r, "hf_latency", cache="dynamic (default)", compiled=False))
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
                                   "hf_static_latency", cache="static", compiled=compiled,
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


# ---------------------------------------------------------------------------- output
def _fmt(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n:.0f} B"


def plot(payload: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", flush=True)
        return None
    sweep = [r for r in payload["records"] if r.get("stage") == "sweep"]
    if not sweep:
        print("no sweep results: no PNG", flush=True)
        return None
    bw, W = payload["copy"]["copy_bytes_per_s"], payload["weight_bytes"]
    bs = [r["batch_size"] for r in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(bs, [r["decode_tokens_per_s"] for r in sweep], "o-", label="engine decode tokens/s")
    ax.plot(bs, [r["output_tokens_per_s"] for r in sweep], "s:", alpha=0.6,
            label="engine output tokens/s (incl. prefill)")
    xs = [min(bs), max(bs)]
    ax.plot(xs, [ceiling_tokens_per_s(b, bw, W) for b in xs], "k--",
            label=f"ceiling b x {_fmt(bw)}/s copy / {_fmt(W)} weights")
    ax.plot(bs, [r["ceiling_with_kv_tokens_per_s"] for r in sweep], "k.", alpha=0.5,
            label="ceiling with KV reads")
    for r in payload["records"]:
        if r.get("stage") in ("hf_latency", "hf_static_latency"):
            ax.plot([1], [r["decode_tokens_per_s"]], "x" if r["stage"] == "hf_latency" else "+",
                    ms=10, label=f"HF generate ({r['cache']}) batch 1")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{payload['model']} {payload['dtype']} on {payload['device']}\n"
                 f"prompt {sweep[0]['prompt_len']}, {sweep[0]['output_len']} new tokens", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny config on CPU, a few tokens")
    ap.add_argument("--quick", action="store_true", help="smaller everything")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--stages", default=",".join(STAGES[:-1]), help=f"subset of {','.join(STAGES)}")
    ap.add_argument("--quantization", choices=["int8", "fp8"], default=None,
                    help="add the quantized stage: 8-bit weights vs the model dtype at batch 1 and 16, same run")
    ap.add_argument("--max-seconds", type=float, default=540.0,
                    help="budget: later parts are shrunk or skipped rather than overrun it")
    ap.add_argument("--model", help="config dir or built-in name (default per profile)")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--output-len", type=int)
    ap.add_argument("--batch-sizes", help="sweep batch sizes, e.g. 1,4,16,64,256")
    ap.add_argument("--sweep-output-len", type=int)
    ap.add_argument("--num-requests", type=int, help="throughput workload size")
    ap.add_argument("--hf-requests", type=int, help="throughput requests HF runs (<= num-requests)")
    ap.add_argument("--hf-batch-size", type=int)
    ap.add_argument("--skip-hf-static", action="store_true",
                    help="no HF static cache + torch.compile run (minutes of compiling on a GPU)")
    ap.add_argument("--out", help="JSON file name in benchmarks/results, or an absolute path "
                                  "(default latency_<device>.json)")
    args = ap.parse_args(argv)
    budget = Budget(args.max_seconds)

    stages = [s for s in args.stages.split(",") if s]
    if args.quantization and "quantized" not in stages:
        stages.append("quantized")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.dry_run:
        prof = "dry"
    elif cuda:
        prof = "gpu_quick" if args.quick else "gpu"
    else:
        prof = "quick" if args.quick else "cpu"
    P = dict(PROFILES[prof])
    for key, val in (("model", args.model), ("prompt_len", args.prompt_len),
                     ("output_len", args.output_len), ("sweep_output_len", args.sweep_output_len),
                     ("num_requests", args.num_requests), ("hf_requests", args.hf_requests),
                     ("hf_batch", args.hf_batch_size)):
        if val is not None:
            P[key] = val
    P["skip_hf_static"] = args.skip_hf_static
    if args.batch_sizes:
        P["batch_sizes"] = [int(b) for b in args.batch_sizes.split(",")]
    dev = P["device"]
    sync = syncer(dev)
    dname = device_name(dev)
    if args.out:
        out_name = args.out
    elif args.dry_run:
        out_name = "latency_dryrun.json"
    else:
        out_name = f"latency_{slug(dname)}{'_quick' if args.quick else ''}.json"

    from engine import LLM
    tmp = tempfile.mkdtemp(prefix="bench_latency_")
    mdir = model_dir(P["model"], tmp)
    need_len = max(P["prompt_len"] + P["output_len"], P["prompt_len"] + P["sweep_output_len"],
                   P["tp_in"][1] + P["tp_out"][1])
    from engine.model.config import ModelConfig
    limit = ModelConfig.from_pretrained(mdir).max_position_embeddings
    if need_len > limit:
        sys.exit(f"the workload needs {need_len} positions; the model has {limit}")
    max_seqs = max(256, max(P["batch_sizes"]))
    # Before the engine: its KV pool takes 90% of the GPU's memory.
    copy = copy_bandwidth(dev, P["copy_mib"], P["copy_repeat"])
    bw = copy["copy_bytes_per_s"]
    if dev == "cuda":
        torch.cuda.empty_cache()
    def build(quantization=None):
        return LLM(mdir, load_format="dummy", dtype=P["dtype"], device=dev, max_model_len=need_len,
                   max_num_seqs=max_seqs, skip_tokenizer_init=True, show_progress=False,
                   quantization=quantization)
    t = time.perf_counter()
    llm = build()
    build_s = time.perf_counter() - t
    cfg = llm.config
    dtype = str(llm.model.dtype).replace("torch.", "")
    W = llm.model.num_bytes()
    kvt = kv_bytes_per_token(cfg, llm.model.dtype.itemsize)
    embed_bytes = llm.model.embed.numel() * llm.model.embed.element_size()
    print(f"model {P['model']} ({cfg.num_params() / 1e9:.3f} B params, {W / 1e9:.3f} GB {dtype}) on "
          f"{dname}; built in {build_s:.1f} s; profile {prof}; budget {args.max_seconds:.0f} s",
          flush=True)
    print(f"  copy bandwidth: {copy['copy_gb_per_s']:.1f} GB/s (read + write, "
          f"{copy['buffer_bytes'] / 2**20:.0f} MiB buffer)", flush=True)
    base = dict(device=dname, dtype=dtype, model=P["model"])
    payload = record(device=dname, dtype=dtype, model=P["model"], profile=prof,
                     torch_version=torch.__version__, stages=stages, budget_s=args.max_seconds,
                     settings={k: v for k, v in P.items() if k != "need"},
                     weight_bytes=W, embed_bytes=embed_bytes, kv_bytes_per_token=kvt,
                     engine_build_s=build_s,
                     cuda_graphs=llm.cuda_graphs,
                     copy=record(**base, batch_size=None, prompt_len=None, output_len=None,
                                 stage="copy", **copy),
                     records=[], notes=[], errors={})

    def save():
        payload["elapsed_s"] = round(budget.seconds - budget.left(), 1)
        return write_json(out_name, payload) if not os.path.isabs(out_name) else _write_abs(out_name, payload)

    save()
    recs = payload["records"]
    # Seconds the later selected stages need at least (kept free by earlier ones).
    def reserve_after(stage):
        later = STAGES[STAGES.index(stage) + 1:]
        return sum(P["need"][s] for s in later if s in stages)

    holder = {"llm": llm}
    del llm
    eng_lat = eng_tp = None
    prompt, eng_tokens = None, []
    for st in STAGES:
        if st not in stages:
            continue
        if budget.left() < P["need"][st]:
            payload["notes"].append(f"{st} skipped: {budget.left():.0f} s left, needs ~{P['need'][st]} s")
            print("  " + payload["notes"][-1], flush=True)
            continue
        t = time.perf_counter()
        try:
            if st == "latency":
                eng_lat, prompt, eng_tokens = stage_latency(holder["llm"], P, base, bw, W, kvt, sync)
                recs.append(eng_lat)
                print(f"  latency batch 1: TTFT {eng_lat['ttft_ms']:.1f} ms, TPOT {eng_lat['tpot_ms']:.2f} ms "
                      f"({eng_lat['decode_tokens_per_s']:.1f} tok/s), bandwidth fraction "
                      f"{eng_lat['bandwidth_fraction']:.3f}, host {eng_lat['host_ms_per_step']:.2f} ms/step "
                      f"{eng_lat['step_split_ms']}", flush=True)
            elif st == "sweep":
                rows, notes = stage_sweep(holder["llm"], P, base, bw, W, kvt, sync, budget,
                                          reserve_after(st))
                recs.extend(rows)
                payload["notes"] += notes
            elif st == "throughput":
                est = max((r["output_tokens_per_s"] for r in recs if r.get("stage") == "sweep"),
                          default=None)
                eng_tp, notes = stage_throughput(holder["llm"], P, base, sync, budget,
                                                 reserve_after(st), est)
                recs.append(eng_tp)
                payload["notes"] += notes
            elif st == "hf":
                if prompt is None:
                    prompt = rand_prompts(1, P["prompt_len"], cfg.vocab_size, seed=1)[0]
                def emit(rec):
                    recs.append(rec)
                    save()
                notes, errors = stage_hf(holder, P, base, sync, budget, eng_lat, eng_tp,
                                         prompt, eng_tokens, emit)
                payload["notes"] += notes
                payload["errors"].update(errors)
            elif st == "quantized":
                from benchmarks.latency_quantized import stage_quantized
                recs.extend(stage_quantized(holder, build, args.quantization or "int8", P, base, bw, kvt, sync,
                                       (run_steps, rand_prompts, decode_bytes_per_step, record)))
        except Exception as e:  # noqa: BLE001  -- record, go on with the next stage
            import traceback
            traceback.print_exc()
            payload["errors"][st] = f"{type(e).__name__}: {str(e)[:2000]}"
            if "llm" not in holder:
                break
        payload.setdefault("stage_seconds", {})[st] = round(time.perf_counter() - t, 1)
        save()
    for n in payload["notes"]:
        print("  note:", n, flush=True)
    paths = save()
    for p in paths:
        print("wrote", p)
    # PNG beside the JSON; a dry or quick run's goes to $OUT or the temp dir
    # (git ignores only their JSON).
    small = args.dry_run or args.quick
    png_dir = (os.environ.get("OUT") or tmp) if small else os.path.dirname(paths[0])
    png = plot(payload, os.path.join(png_dir, os.path.basename(out_name).replace(".json", ".png")))
    if png:
        print("wrote", png)
        if os.environ.get("OUT") and not small:
            shutil.copy(png, os.environ["OUT"])
    return payload


def _write_abs(path: str, payload) -> list[str]:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return [path]


if __name__ == "__main__":
    result = main()
    # A failed engine stage (or the HF stage as a whole) fails the run; the HF
    # sub-runs (e.g. static cache + compile) only record their error.
    sys.exit(1 if any(k in STAGES for k in result["errors"]) else 0)
