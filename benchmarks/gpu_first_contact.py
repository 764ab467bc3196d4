"""GPU first contact: the whole GPU check in one command with a hard deadline.

    TRITON_INTERPRET=0 PYTHONPATH=. timeout 400 python3 benchmarks/gpu_first_contact.py

(`make gpu-check`; give the device tool a timeout_s of 420). A lent GPU comes with
15 minutes of device time in all, start-up included: this is the one ~6-minute
command, and ``--steps`` picks a subset for a second, ~4-minute one. Steps, most
valuable first (each skipped when its estimated need no longer fits the deadline,
each wrapped so that a failure is recorded and the rest still run):

  probe     versions, SMs, memory, optional packages, kernels compiled (not interpreted)
  kernels   every Triton kernel at the 7B shape vs kernels/reference.py, fp16 and bf16:
            error, seconds to first compile, host us per launch
  ceilings  copy bandwidth; cuBLAS M=1 GEMV bandwidth of the 5 weight shapes, as graph
            replays over weight copies spanning > 4x the L2 (benchmarks/device_timing.py);
            our decode GEMV vs cuBLAS (fp16) and w8a16 (int8) at 1 and 16 rows, and the
            kernels/gemv_table.json entry that follows from it
  engine    one 7B dummy engine (fp16), built once: start-up phases, KV sizing, memory,
            whether CUDA graphs were captured
  graphs    graph replay vs eager on that engine: identical greedy tokens and log-probs
  decode    batch 1, 128-token prompt, 256 tokens through step(): TTFT, TPOT median/p90,
            host split, bandwidth fraction, compiles after warm-up (must be 0), eager TPOT
  profile   torch.profiler of 3 eager steps and 3 graph replays: kernel us, idle gaps
  sweep     4, 16, 64, 256 sequences x 64 tokens, each after a same-shape warm-up
  verify    a speculative verify step (k=4, oracle drafts) vs a plain decode step, batch 1
            and 16 (target <= 1.15x at batch 1)
  int8      an int8 7B engine (W8A16) vs the fp16 one, batch-1 decode (target >= 1.6x), then
            fp8 on sm_89+; each engine is built after the one before is freed
  micro     decode attention GB/s (graph split count vs live), prefill vs SDPA flash
  real      the embedded miniature Self-RAG model (trained, in the repository) in fp16 and
            bf16 vs HF's fp32 CPU reference: top-1 agreement, max chosen log-prob error
  knobs     the sampler with every sampling knob on 64 rows vs plain (target <= 1.3x)
  tests     if 90 s remain: every test that skips without CUDA, then the kernel tests compiled

Writes benchmarks/results/first_contact_<device>.json after every step (and into $OUT
when set), plus first_contact.log (flushed as it goes), first_contact_profile.txt,
first_contact_tests.log and first_contact_sweep.png beside it in $OUT (else in a
temp folder). ``--dry-run`` runs every step on CPU at tiny shapes (Triton's
interpreter for the kernels; `make test` runs it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (name, seconds left below which the step is skipped, seconds it is expected to take on
# an H200). Expected: measured where a run measured it (the H200 check of 2026-11-30, fresh
# machine, `first_contact_h200.json`), else estimated, with the arithmetic:
#   kernels  18 s for 30 compiled variants (~0.6 s each); the 8-bit cases add ~24 variants
#   ceilings 0.2 s eager; the graphs over ~1.2 GB of weight copies add ~2 s; the GEMV
#            sweep (issue 31) ~9 s more: 6 gemv (2 fused), 1 silu_and_mul and ~4 w8a16
#            compiles (~0.6 s each) and 44 graphs (9 matrices and 2 fused downs x 2 row
#            counts x ours/library) of ~0.05 s capture each
#   kernels  the 7B's w8a16 variants are compiled by then (the sweep): 3 s less
#   engine   1.1 s measured with decode graphs; prefill graphs (6 buckets) ~2-3 s more
#   verify   4 runs x 40 steps x ~5 ms at batch 1 and 16, plus the verify graphs' capture
#            (9 buckets, ~0.5 s) and 7 generates of 64 tokens with a host-side processor
#   decode   measured 4.7 s; + the other scheduling mode (2 x 256 steps x ~4.6 ms) and a
#            cProfiled eager run (64 steps x ~17 ms, ~2x under cProfile): ~10 s
#   int8     two 7B engines (int8, fp8): dummy weights quantized on the GPU (~2 s), KV
#            profile and graphs compiling ~10 variants each (~6 s), 2 x 64 timed steps
#   real     HF fp32 on the CPU (~3 s), fp16 and bf16 engines of the miniature model
#            compiling ~15 variants each (~9 s)
#   tests    95.6 s for the last 8 files of CUDA_TESTS; the first three ~55 s (~60 more
#            compiles of odd shapes and the 8-bit engine tests)
# Order: by value (issue 28): the engine, then verify steps, TTFT and decode with and
# without async scheduling, then the rest; ceilings (3 s) first, as the TTFT target reads
# the copy bandwidth it measures.
# Sum: 300 s of the 330 s deadline (tests/test_gpu_first_contact.py keeps it under 300).
STEPS = [("probe", 5, 5), ("ceilings", 20, 12), ("engine", 60, 5), ("verify", 25, 13), ("decode", 20, 10),
         ("graphs", 15, 2), ("kernels", 40, 29), ("profile", 10, 6), ("sweep", 25, 5), ("int8", 90, 30),
         ("micro", 20, 2), ("real", 30, 25), ("knobs", 15, 3),
         ("tests", 90, 150)]
DEADLINE_S = 330


def _step_functions():
    from benchmarks.first_contact import (
        device_steps,
        engine_steps,
        int8_step,
        kernel_checks,
        knobs_step,
        real_model_step,
        trace_steps,
        verify_step,
    )

    def micro(ctx):
        ctx.release_engine()                   # its KV pool holds most of the GPU
        return device_steps.micro(ctx)
    return dict(probe=device_steps.probe, kernels=kernel_checks.run, ceilings=device_steps.ceilings,
                engine=engine_steps.engine, graphs=engine_steps.graphs, decode=engine_steps.decode,
                profile=trace_steps.profile, sweep=engine_steps.sweep, micro=micro,
                real=real_model_step.real_model, knobs=knobs_step.knobs, tests=trace_steps.tests,
                verify=verify_step.verify, int8=int8_step.int8)


NEEDS_ENGINE = {"graphs", "decode", "profile", "sweep", "verify", "int8"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", help="comma-separated subset, in any order (run in the order above): "
                                    + ",".join(n for n, _, _ in STEPS))
    ap.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny shapes")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S,
                    help=f"seconds from start after which nothing new starts (default {DEADLINE_S})")
    args = ap.parse_args(argv)
    names = [n for n, _, _ in STEPS]
    chosen = names if not args.steps else [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in chosen if s not in names]
    if bad:
        ap.error(f"unknown step(s) {bad}; choose from {names}")
    if args.dry_run:
        # Before triton is imported: without CUDA the kernels can only be interpreted.
        import torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
        # One thread: two OpenMP threads stall for a scheduler tick on every tiny op
        # when the other core is busy (a test run beside this one), ~16 ms a step.
        torch.set_num_threads(1)
        device = "cpu"
    else:
        import torch
        if not torch.cuda.is_available():
            ap.error("no CUDA device: use --dry-run to run the steps on CPU")
        device = "cuda"
    # A step that needs the engine builds it when "engine" is not among the chosen steps.
    if set(chosen) & NEEDS_ENGINE and "engine" not in chosen:
        chosen.append("engine")
    from benchmarks.common import device_name, slug
    from benchmarks.first_contact.common import Context, run_step
    dname = device_name(device)
    name = "first_contact_dryrun" if args.dry_run else f"first_contact_{_short(slug(dname))}"
    out_dir = os.environ.get("OUT") or None
    ctx = Context(args.dry_run, args.deadline, device, out_dir, name,
                  log_dir=out_dir or tempfile.mkdtemp(prefix="first_contact_"))
    ctx.payload.update(device=dname, steps_chosen=[n for n in names if n in chosen])
    ctx.log(f"first contact on {dname}: steps {ctx.payload['steps_chosen']}, deadline {args.deadline:.0f} s; "
            f"log and extra files in {ctx.log_dir}")
    fns = _step_functions()
    need = {n: need_s for n, need_s, _ in STEPS}
    for n in names:
        if n in chosen:
            run_step(ctx, n, fns[n], 1 if args.dry_run else need[n])
    paths = ctx.save()
    steps = ctx.payload["steps"]
    bad = {n: s["status"] for n, s in steps.items() if s["status"] not in ("ok", "skipped")}
    for n, s in steps.items():
        extra = "; ".join(s.get("result", {}).get("failures", []) or [s.get("error", "")]) \
            if s["status"] not in ("ok", "skipped") else s.get("reason", "")
        ctx.log(f"{n:9s} {s['status']:8s} {s.get('seconds', 0):6.1f} s  {extra}")
    for p in paths:
        ctx.log(f"wrote {p}")
    return 1 if bad else 0


def _short(device_slug: str) -> str:
    """'nvidia_h200' -> 'h200', 'nvidia_h100_80gb_hbm3' -> 'h100' (the results file name)."""
    parts = [p for p in device_slug.split("_") if p != "nvidia"]
    return parts[0] if parts else device_slug


if __name__ == "__main__":
    sys.exit(main())
