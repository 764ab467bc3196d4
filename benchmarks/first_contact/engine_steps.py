"""Steps on one engine built once: "engine", "graphs", "decode", "profile", "sweep".

GPU: dummy weights of the selfrag-7b shape in fp16, max_model_len 4096, 256
sequences, the KV pool sized from memory. Dry run: a tiny config on CPU with the
reference ops (no graphs there; the same code paths run).

Timing rules: every timed run is preceded by a warm-up at exactly its shapes with
other tokens (so the prefix cache cannot shorten the timed prefill); compiled Triton
variants are counted around each timed run and must not grow; time to first token is
read from the engine's generated-token count, not from the (one step late) outputs;
``host_ms_per_step`` is every phase of ``LLM.step_times`` except ``wait`` (the
read-back that waits for the device): schedule + prepare + launch + sample + output.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time

import torch

from benchmarks.first_contact.common import compiled_variants, summary

DRY_CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, model_type="llama")


def sizes(dry: bool) -> dict:
    if dry:
        return dict(prompt=16, new=8, eager_new=4, graph_prompts=4, graph_new=6, sweep=[2, 4],
                    sweep_new=4, max_num_seqs=8)
    return dict(prompt=128, new=256, eager_new=64, graph_prompts=4, graph_new=32,
                sweep=[4, 16, 64, 256], sweep_new=64, max_num_seqs=256)


def rand_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """BOS + seeded random ids; different seeds never share a first block."""
    g = random.Random(seed)
    return [[1] + [g.randrange(3, vocab - 1) for _ in range(length - 1)] for _ in range(n)]


def engine(ctx) -> dict:
    S = sizes(ctx.dry)
    if ctx.dry:
        model = tempfile.mkdtemp(prefix="first_contact_")
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump(DRY_CONFIG, f)
        kw = dict(dtype="float32", device="cpu", kernel_backend="torch")
    else:
        model, kw = "selfrag-7b", dict(dtype="float16", device="cuda")
    t = time.perf_counter()
    llm = ctx.new_engine(model, load_format="dummy", max_num_seqs=S["max_num_seqs"], skip_tokenizer_init=True,
                         show_progress=False, **kw)
    build_s = time.perf_counter() - t
    ctx.shared["llm"] = llm
    m = llm.model
    embed = m.embed.numel() * m.embed.element_size()
    cfg = llm.config
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * m.dtype.itemsize
    ctx.shared.update(step_weight_bytes=m.num_bytes() - embed, kv_per_token=kv_per_token)
    out = dict(build_s=build_s, startup=llm.startup, cuda_graphs=llm.cuda_graphs,
               weight_bytes=m.num_bytes(), embed_bytes=embed, step_weight_bytes=m.num_bytes() - embed,
               kv_bytes_per_token=kv_per_token, max_model_len=llm.max_model_len,
               max_num_seqs=llm.max_num_seqs, dtype=str(m.dtype).replace("torch.", ""),
               kernel_backend=m.ops.name)
    if ctx.cuda:
        free, total = torch.cuda.mem_get_info()
        out["memory"] = dict(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved(),
                             free=free, total=total)
    g = llm.cuda_graphs
    phases = {k: round(v, 2) for k, v in llm.startup.items() if k.endswith('_s')}
    ctx.log(f"   built in {build_s:.1f} s {json.dumps(phases)}; "
            f"graphs: {'captured ' + str(g['buckets']) if g['enabled'] else 'OFF (' + g['reason'] + ')'}"
            + (f" error: {g['error']}" if g["error"] else ""))
    failures = [] if g["enabled"] or not ctx.cuda else [f"CUDA graphs not used: {g['reason']} {g['error'] or ''}"]
    return dict(out, failures=failures)


def _eager_runner(llm, same_as_graphs: bool):
    """An eager DecodeRunner on the engine's model and KV cache; ``same_as_graphs``: padded
    to the graph buckets with the graphs' fixed split counts (bit-identical work)."""
    from engine.worker.cuda_graphs import DecodeRunner
    g = llm.decode_runner
    return DecodeRunner(llm.model, llm.runner.kv_caches, llm.block_size, llm.max_num_seqs,
                        llm.max_model_len, num_splits=g.num_splits if same_as_graphs else None,
                        pad_to_buckets=same_as_graphs)


def graphs(ctx) -> dict:
    """Graph replay vs eager on the same engine: greedy tokens and their log-probs."""
    from engine import SamplingParams
    llm, S = ctx.shared["llm"], sizes(ctx.dry)
    prompts = [{"prompt_token_ids": p} for p in rand_prompts(S["graph_prompts"], S["prompt"],
                                                             llm.config.vocab_size, seed=21)]
    sp = SamplingParams(temperature=0, max_tokens=S["graph_new"], ignore_eos=True, logprobs=0)
    graphed = llm.decode_runner

    def run(runner):
        llm.decode_runner = runner
        llm.block_manager.reset_prefix_cache()      # the same prompts, prefilled in full each time
        try:
            outs = llm.generate(prompts, sp, use_tqdm=False)
        finally:
            llm.decode_runner = graphed
        return [(o.outputs[0].token_ids, [d[t].logprob for d, t in zip(o.outputs[0].logprobs,
                                                                      o.outputs[0].token_ids)])
                for o in outs]

    def compare(a, b):
        first, lp_diff = None, 0.0
        for i, ((ta, la), (tb, lb)) in enumerate(zip(a, b)):
            n = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
            if n is not None and first is None:
                first = dict(prompt=i, position=n)
            upto = n if n is not None else len(ta)
            lp_diff = max([lp_diff] + [abs(x - y) for x, y in zip(la[:upto], lb[:upto])])
        return dict(identical_tokens=first is None, first_divergence=first, max_logprob_diff=lp_diff)

    replay = run(graphed)
    same = run(_eager_runner(llm, True))
    live = run(_eager_runner(llm, False))
    out = dict(graphs_enabled=llm.cuda_graphs["enabled"], prompts=len(prompts), new_tokens=S["graph_new"],
               graph_vs_eager_same_splits=compare(replay, same),
               graph_vs_eager_live_splits=compare(replay, live),
               note="same_splits: the eager forward padded to the bucket with the graph's split "
                    "counts (the same kernels and grids: tokens must be identical); live_splits: "
                    "eager with splits picked per step (another reduction order: fp16 noise)")
    ctx.log(f"   graph vs eager (same splits): {out['graph_vs_eager_same_splits']}; "
            f"(live splits): {out['graph_vs_eager_live_splits']}")
    # The target is identical tokens; the log-prob difference is recorded (0 unless cuBLAS
    # picks other kernels under capture than eagerly).
    c = out["graph_vs_eager_same_splits"]
    failures = [] if c["identical_tokens"] else [f"graph replay and the same eager forward differ: {c}"]
    return dict(out, failures=failures)


def has_first_token(llm, rid: str) -> bool:
    """The request has sampled a token (or already finished): read from the engine's
    count, which async output processing does not delay."""
    n = llm.num_generated_tokens(rid)
    return n is None or n >= 1


def run_one(ctx, llm, prompt: list[int], new: int) -> dict:
    """One request through step(): TTFT from the generated-token count, per-step times
    and the host split of the decode steps."""
    from engine import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    ctx.sync()
    t0 = time.perf_counter()
    rid = llm.add_request({"prompt_token_ids": prompt}, sp)
    ttft, steps, before, n0, tokens = None, [], None, 0, None
    while llm.has_unfinished_requests():
        a = time.perf_counter()
        for o in llm.step():
            if o.request_id == rid and o.finished:
                tokens = o.outputs[0].token_ids
        b = time.perf_counter()
        if ttft is None:
            if has_first_token(llm, rid):
                ttft = b - t0
                before, n0 = dict(llm.step_times), llm.num_steps
        else:
            steps.append(b - a)
    n = max(1, llm.num_steps - n0)
    split = {k: (llm.step_times[k] - before[k]) / n * 1e3 for k in llm.step_times} if before else {}
    return dict(ttft_s=ttft, step_s=steps, split_ms=split, tokens=tokens,
                host_ms_per_step=sum(v for k, v in split.items() if k != "wait"))


def decode(ctx) -> dict:
    llm, S = ctx.shared["llm"], sizes(ctx.dry)
    V, P, N = llm.config.vocab_size, S["prompt"], S["new"]
    run_one(ctx, llm, rand_prompts(1, P, V, seed=31)[0], N)          # warm-up: the timed shapes
    c0 = compiled_variants()
    prompt = rand_prompts(1, P, V, seed=32)[0]
    r = run_one(ctx, llm, prompt, N)
    compiles = compiled_variants() - c0
    bare = _bare_replay_s(ctx, llm)                 # the same batch and context, just after
    overlap = llm.async_scheduling
    llm.async_scheduling = not overlap              # the other mode, same shapes
    try:
        run_one(ctx, llm, rand_prompts(1, P, V, seed=36)[0], N)
        other = run_one(ctx, llm, prompt, N)            # the same tokens, token for token
    finally:
        llm.async_scheduling = overlap
    graphed, prefill_graphs = llm.decode_runner, llm.prefill_runner
    llm.decode_runner, llm.prefill_runner = _eager_runner(llm, False), None
    try:
        run_one(ctx, llm, rand_prompts(1, P, V, seed=33)[0], S["eager_new"])   # eager warm-up
        e = run_one(ctx, llm, rand_prompts(1, P, V, seed=34)[0], S["eager_new"])
        host_profile = _host_profile(ctx, llm, rand_prompts(1, P, V, seed=35)[0], S["eager_new"])
    finally:
        llm.decode_runner, llm.prefill_runner = graphed, prefill_graphs
    tpot = summary(r["step_s"])
    mean_ctx = P + N / 2
    step_bytes = ctx.shared["step_weight_bytes"] + ctx.shared["kv_per_token"] * mean_ctx
    copy_bw = ctx.shared.get("copy_bytes_per_s")
    gemv = ctx.shared.get("gemv_step_s")
    med = tpot["median"]
    weight_read_ms = ctx.shared["step_weight_bytes"] / copy_bw * 1e3 if copy_bw else None
    out = dict(prompt_len=P, new_tokens=N, ttft_ms=r["ttft_s"] * 1e3, tpot_ms=summary(r["step_s"], 1e3),
               ttft_eager_prefill_ms=e["ttft_s"] * 1e3, prefill_graphs=llm.prefill_graphs,
               async_scheduling=overlap, scheduling_stats=llm.scheduling_stats,
               tpot_other_mode_ms=summary(other["step_s"], 1e3),
               bare_replay_ms=None if bare is None else bare * 1e3,
               tpot_over_bare_replay=None if bare is None else med / bare,
               weight_read_ms=weight_read_ms, eager_host_profile=host_profile,
               decode_tokens_per_s=1 / med, host_ms_per_step=r["host_ms_per_step"], step_split_ms=r["split_ms"],
               compiles_after_warmup=compiles, bytes_per_step=step_bytes,
               bandwidth_fraction_of_copy=step_bytes / med / copy_bw if copy_bw else None,
               fraction_of_gemv_ceiling=gemv / med if gemv else None,
               eager=dict(new_tokens=S["eager_new"], tpot_ms=summary(e["step_s"], 1e3),
                          host_ms_per_step=e["host_ms_per_step"], step_split_ms=e["split_ms"]),
               graph_speedup_vs_eager=summary(e["step_s"])["median"] / med,
               host_note="host_ms_per_step: schedule + prepare + launch + sample + output per decode "
                         "step (LLM.step_times without wait); device time excluded")
    out["targets"] = dict(bandwidth_fraction_ge_0_88=(out["bandwidth_fraction_of_copy"] or 0) >= 0.88,
                          ttft_le_2_5x_weight_read=bool(weight_read_ms) and out["ttft_ms"] <= 2.5 * weight_read_ms,
                          eager_host_le_5ms=out["eager"]["host_ms_per_step"] <= 5.0,
                          tpot_le_1_03x_bare_replay=bare is not None and overlap and med <= 1.03 * bare,
                          zero_compiles=compiles == 0)
    ctx.log(f"   batch 1: TTFT {out['ttft_ms']:.1f} ms (eager prefill {out['ttft_eager_prefill_ms']:.1f} ms; "
            f"2.5x the weight read: {2.5 * (weight_read_ms or 0):.1f} ms), eager host "
            f"{out['eager']['host_ms_per_step']:.2f} ms/step, top host functions "
            f"{[f['function'] for f in host_profile[:3]]}")
    ctx.log(f"   batch 1: TPOT {med * 1e3:.3f} ms with async scheduling {overlap}, "
            f"{out['tpot_other_mode_ms']['median']:.3f} ms with it {not overlap}; bare graph replay "
            f"{(bare or 0) * 1e3:.3f} ms ({out['tpot_over_bare_replay'] or 0:.3f}x); {llm.scheduling_stats}")
    ctx.log(f"   batch 1: TTFT {out['ttft_ms']:.1f} ms, TPOT {out['tpot_ms']['median']:.3f} ms "
            f"(p90 {out['tpot_ms']['p90']:.3f}) = {out['decode_tokens_per_s']:.0f} tok/s, "
            f"{100 * (out['bandwidth_fraction_of_copy'] or 0):.0f}% of copy, host "
            f"{out['host_ms_per_step']:.3f} ms/step, eager {out['eager']['tpot_ms']['median']:.3f} ms, "
            f"compiles {compiles}")
    failures = [] if compiles == 0 else [f"{compiles} compiles after warm-up"]
    out["same_tokens_both_modes"] = r["tokens"] == other["tokens"] and r["tokens"] is not None
    if not out["same_tokens_both_modes"]:
        failures.append("async scheduling on and off gave different tokens")
    return dict(out, failures=failures)


def _bare_replay_s(ctx, llm, n: int = 50) -> float | None:
    """Median seconds of the batch-1 decode graph's ``replay()`` alone, timed with CUDA
    events, on the inputs the last step staged (its batch and context): the floor a
    step's TPOT is held to. None without graphs (CPU)."""
    runner = llm.decode_runner
    graph = getattr(runner, "graphs", {}).get((1, 1))
    if graph is None or not ctx.cuda:
        return None
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def _host_profile(ctx, llm, prompt: list[int], new: int, top: int = 15) -> list[dict]:
    """cProfile of eager steps (prefill and decode): the functions with the most own host
    time, per step. What an eager step's host milliseconds are made of, so the launchers
    can be thinned where the time goes."""
    import cProfile
    import pstats

    from engine import SamplingParams
    llm.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    n0 = llm.num_steps
    prof = cProfile.Profile()
    prof.enable()
    while llm.has_unfinished_requests():
        llm.step()
    prof.disable()
    ctx.sync()
    steps = max(1, llm.num_steps - n0)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in pstats.Stats(prof).stats.items():
        rows.append(dict(function=f"{os.path.basename(file)}:{line}:{fn}", calls_per_step=nc / steps,
                         own_ms_per_step=tt / steps * 1e3, cumulative_ms_per_step=ct / steps * 1e3))
    rows.sort(key=lambda r: -r["own_ms_per_step"])
    return rows[:top]


def sweep(ctx) -> dict:
    """Batch sweep: decode step time and tokens/s against the bandwidth ceiling."""
    from engine import SamplingParams
    llm, S = ctx.shared["llm"], sizes(ctx.dry)
    V, P = llm.config.vocab_size, S["prompt"]
    copy_bw = ctx.shared.get("copy_bytes_per_s")
    rows, failures = [], []
    for i, b in enumerate(S["sweep"]):
        if ctx.left() < 15 and rows:
            break

        def batch(seed, new):
            sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
            ids = [llm.add_request({"prompt_token_ids": p}, sp) for p in rand_prompts(b, P, V, seed)]
            steps = []
            while llm.has_unfinished_requests():
                prefilled = all(has_first_token(llm, r) for r in ids)
                a = time.perf_counter()
                llm.step()
                if prefilled:
                    steps.append(time.perf_counter() - a)
            return steps
        batch(1000 + i, 4)                                  # warm-up: the same batch and prompts shape
        c0 = compiled_variants()
        steps = batch(2000 + i, S["sweep_new"])
        compiles = compiled_variants() - c0
        med = summary(steps)["median"]
        step_bytes = ctx.shared["step_weight_bytes"] + b * ctx.shared["kv_per_token"] * (P + S["sweep_new"] / 2)
        rows.append(dict(batch=b, decode_steps=len(steps), step_ms=summary(steps, 1e3),
                         tokens_per_s=b / med, compiles_after_warmup=compiles,
                         bandwidth_fraction_of_copy=step_bytes / med / copy_bw if copy_bw else None,
                         ceiling_tokens_per_s=b * copy_bw / step_bytes if copy_bw else None))
        if compiles:
            failures.append(f"batch {b}: {compiles} compiles after warm-up")
        ctx.log(f"   batch {b:4d}: {rows[-1]['step_ms']['median']:.3f} ms/step, "
                f"{rows[-1]['tokens_per_s']:.0f} tok/s, compiles {compiles}")
    png = _plot(ctx, rows)
    return dict(rows=rows, png=png, failures=failures)


def _plot(ctx, rows) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bs = [r["batch"] for r in rows]
    ax.plot(bs, [r["tokens_per_s"] for r in rows], "o-", label="engine decode tokens/s")
    if rows[0]["ceiling_tokens_per_s"]:
        ax.plot(bs, [r["ceiling_tokens_per_s"] for r in rows], "k--", label="copy-bandwidth ceiling")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens/s",
           title=f"decode sweep ({'dry run, CPU' if ctx.dry else 'selfrag-7b fp16'})")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = ctx.artifact("first_contact_sweep.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)
