"""Steps "profile" (a torch.profiler trace of eager steps and graph replays) and
"tests" (the CUDA test subset in a subprocess, in what is left of the deadline).

profile  3 eager decode steps and 3 graph replays of the engine, each traced on
         its own: per-kernel device µs (top kernels), and the device's idle gaps
         between consecutive kernels (span - busy), which is what launch overhead
         costs an eager step. The full key_averages table goes to a text file.
tests    pytest on every test that skips without CUDA (8-bit weights, CUDA graphs,
         pinned staging, engine parity against HF transformers), then the Triton
         kernel and persistent decode-input tests compiled, with
         SELFRAG_TEST_DEVICE=cuda; output streamed to a log file as it comes, the
         run killed at the deadline with what it printed kept.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time

from benchmarks.first_contact.engine_steps import _eager_runner, has_first_token, rand_prompts, sizes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every test module with a test that skips without CUDA is here (tests/test_gpu_first_contact.py
# checks), those first: nothing else ever runs them, and a run cut at the deadline keeps
# what ran. Then the kernel and engine tests again, compiled instead of interpreted.
# Measured on the H200 (2026-11-30): the last eight files 88 s of pytest (95.6 s in all,
# 167 tests); the first four are estimated at ~55 s (README "GPU check budget").
CUDA_TESTS = ["tests/test_triton_w8a16.py", "tests/test_quantized_weights.py", "tests/test_host_to_device.py",
              "tests/test_cuda_graphs.py",
              "tests/test_engine_parity.py", "tests/test_triton_decode_attention.py",
              "tests/test_triton_prefill_attention.py",
              # async scheduling with real graphs (decode, verify, prefill): CPU runs its
              # code path, only here does it run beside a device that is still computing
              "tests/test_async_scheduling.py", "tests/test_reference_ops.py",
              "tests/test_triton_elementwise.py", "tests/test_kernel_specialization.py",
              "tests/test_decode_inputs.py"]


def _device_events(prof):
    """(name, start_us, end_us) of the trace's device kernels, in start order."""
    from torch.autograd import DeviceType
    evs = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
           if getattr(e, "device_type", None) == DeviceType.CUDA]
    return sorted(evs, key=lambda e: e[1])


def _trace(ctx, llm, runner, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    graphed = llm.decode_runner
    llm.decode_runner = runner
    try:
        llm.step()                                   # one untraced step at this runner's shapes
        ctx.sync()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                llm.step()
            ctx.sync()
    finally:
        llm.decode_runner = graphed
    sort = "device_time_total" if ctx.cuda else "cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
    except Exception:  # noqa: BLE001 - older spellings
        table = prof.key_averages().table(sort_by="cuda_time_total" if ctx.cuda else sort, row_limit=40)
    evs = _device_events(prof) if ctx.cuda else []
    out = dict(steps=steps, device_kernels=len(evs))
    if evs:
        busy = sum(e - s for _, s, e in evs)
        span = evs[-1][2] - evs[0][1]
        gaps = [max(0.0, b[1] - a[2]) for a, b in zip(evs, evs[1:])]
        per = {}
        for name, s, e in evs:
            per.setdefault(name, [0.0, 0])
            per[name][0] += e - s
            per[name][1] += 1
        top = sorted(per.items(), key=lambda kv: -kv[1][0])[:15]
        out.update(device_busy_us_per_step=busy / steps, device_span_us_per_step=span / steps,
                   idle_fraction=1 - busy / span if span else None,
                   median_gap_us=statistics.median(gaps) if gaps else None,
                   top_kernels=[dict(name=n[:120], us_per_step=t / steps, calls_per_step=c / steps)
                                for n, (t, c) in top])
    return out, table


def profile(ctx) -> dict:
    llm, S = ctx.shared["llm"], sizes(ctx.dry)
    from engine import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    rid = llm.add_request({"prompt_token_ids": rand_prompts(1, S["prompt"], llm.config.vocab_size, 41)[0]}, sp)
    while not has_first_token(llm, rid):
        llm.step()                                   # prefill outside the traces
    eager, e_table = _trace(ctx, llm, _eager_runner(llm, False), 3)
    graph, g_table = _trace(ctx, llm, llm.decode_runner, 3)
    llm.abort(rid)
    path = ctx.artifact("first_contact_profile.txt")
    with open(path, "w") as f:
        f.write("== 3 eager decode steps ==\n" + e_table + "\n\n== 3 graph replays ==\n" + g_table + "\n")
    for label, r in (("eager", eager), ("graph", graph)):
        if r.get("device_span_us_per_step"):
            ctx.log(f"   {label}: device busy {r['device_busy_us_per_step']:.0f} us of a "
                    f"{r['device_span_us_per_step']:.0f} us span per step, median gap "
                    f"{r['median_gap_us']:.1f} us, {r['device_kernels'] // 3} kernels per step")
    return dict(eager=eager, graph=graph, table_file=os.path.basename(path))


def tests(ctx) -> dict:
    """The CUDA test subset in a subprocess, killed at the deadline; output kept."""
    ctx.release_engine()
    files = CUDA_TESTS if not ctx.dry else ["tests/test_decode_inputs.py"]
    env = {**os.environ, "PYTHONPATH": REPO, "SELFRAG_TEST_DEVICE": "cuda" if ctx.cuda else "cpu"}
    if ctx.cuda:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if ctx.dry:
        cmd += ["-k", "one_copy_per_step"]
    log_path = ctx.artifact("first_contact_tests.log")
    limit = max(5, int(ctx.left() - 10))
    ctx.log(f"   {' '.join(cmd[3:])} (limit {limit} s) -> {os.path.basename(log_path)}")
    t = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = 124
    with open(log_path) as f:
        text = f.read()
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", text)}
    out = dict(files=files, rc=rc, seconds=round(time.perf_counter() - t, 1), counts=counts,
               tail=text[-2500:], log_file=os.path.basename(log_path))
    ctx.log(f"   tests: rc {rc}, {counts}")
    fails = [] if rc == 0 else [f"pytest rc {rc} ({'killed at the deadline' if rc == 124 else counts})"]
    return dict(out, failures=fails)
