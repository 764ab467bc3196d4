"""bench_latency.py's engine stages: ``latency`` (batch 1: TTFT, TPOT, bandwidth fraction,
host time per decode step), ``sweep`` (decode per batch size against the ceiling) and
``throughput`` (the seeded workload through ``llm.generate``), over the step API driver
``run_steps`` and the seeded prompts the HF peer shares (``rand_prompts``,
``throughput_workload``).
"""
from __future__ import annotations

import random
import statistics
import time

import torch

from benchmarks.common import record
from benchmarks.latency_roofline import bandwidth_fraction, ceiling_tokens_per_s, decode_bytes_per_step


def syncer(device: str):
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def rand_prompts(n: int, length, vocab: int, seed: int) -> list[list[int]]:
    """Seeded random prompts (BOS + ids); distinct per call, so prefix caching never hits."""
    g = random.Random(seed)
    lengths = [length] * n if isinstance(length, int) else length
    return [[1] + [g.randrange(3, vocab - 1) for _ in range(L - 1)] for L in lengths]


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
