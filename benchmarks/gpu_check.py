"""The one-command GPU check: ``make gpu-check [STAGE=tests|kernels|e2e]``.

Runs on a lent GPU machine's own python (no venv, no registry) with
``PYTHONPATH=.``. Each stage stays under 9 minutes and leaves one JSON in
``$OUT`` (and ``benchmarks/results/``):

  tests    the engine test-suite with the engine on CUDA (SELFRAG_TEST_DEVICE=cuda);
  kernels  the Triton kernel tests compiled on the GPU (bf16 too), then
           benchmarks/bench_kernels.py (prefill vs SDPA flash, decode vs the
           naive paged reference and the copy bandwidth; JSON + PNG);
  e2e      loading benchmark at the full selfrag-7B shape (bf16, 3 shards,
           built on the device's disk) and greedy decode tokens/s of dummy 7B
           weights in fp16 at batch 1 and 16, and the Self-RAG short-form
           benchmark (10 passages) on the embedded model, then
           benchmarks/bench_latency.py (TTFT / TPOT / bandwidth fraction at
           batch 1, batch sweep, throughput, HF generate peer) in the time
           left of the stage's budget.

``--dry-run`` runs the same code paths on CPU at tiny sizes.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import device_name, record, slug, write_json  # noqa: E402

STAGE_BUDGET_S = 540      # each stage stays under 9 minutes


def run(cmd, env=None, timeout=520):
    print("+", " ".join(cmd), flush=True)
    t = time.time()
    p = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    print(p.stdout[-6000:], flush=True)
    return {"cmd": " ".join(cmd), "rc": p.returncode, "seconds": round(time.time() - t, 1),
            "tail": p.stdout[-3000:]}


def stage_tests(dry: bool):
    env = {"SELFRAG_TEST_DEVICE": "cpu" if dry else "cuda", "PYTHONPATH": REPO}
    args = [sys.executable, "-m", "pytest", "-q", "-x" if dry else "-q", "tests"]
    if dry:
        args += ["-k", "greedy_matches_hf and gqa"]
    return {"pytest": run(args, env)}


def stage_kernels(dry: bool):
    """Kernel tests compiled on the GPU (incl. bf16 dot kernels the interpreter
    can't run), the offline report, then the kernel benchmarks."""
    env = {"PYTHONPATH": REPO, "SELFRAG_TEST_DEVICE": "cuda"}
    out = {}
    if not dry:
        out["pytest"] = run([sys.executable, "-m", "pytest", "-q", "tests/test_reference_ops.py"]
                            + sorted(glob.glob(os.path.join(REPO, "tests", "test_triton_*.py"))), env)
    else:
        env.update(TRITON_INTERPRET="1", SELFRAG_TEST_DEVICE="cpu")
    out["bench"] = run([sys.executable, "benchmarks/bench_kernels.py"] + (["--dry-run"] if dry else []),
                       env)
    out["results"] = _newest_json("kernels_*.json")
    return out


def _newest_json(pattern: str):
    """The newest benchmarks/results/PATTERN file's contents (None if none)."""
    paths = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", pattern)), key=os.path.getmtime)
    if not paths:
        return None
    with open(paths[-1]) as f:
        return {"file": os.path.basename(paths[-1]), "data": json.load(f)}


def stage_e2e(dry: bool):
    t0 = time.time()
    out = {}
    load = [sys.executable, "benchmarks/bench_loading.py", "--repeat", "1", "--cleanup"]
    load_json = os.path.join(REPO, "benchmarks", "results",
                             "loading_dryrun.json" if dry else "loading_cuda_7b.json")
    load += (["--size-gb", "0.05", "--device", "cpu"] if dry
             else ["--preset", "selfrag-7b", "--device", "cuda"]) + ["--out", load_json]
    out["loading"] = run(load)
    if os.path.exists(load_json):
        with open(load_json) as f:
            out["loading_result"] = json.load(f)
    out["decode"] = decode_7b(dry)
    _release_cuda(dry)      # decode_7b's engine is gone; the subprocesses below need its memory
    out["selfrag"] = run([sys.executable, "benchmarks/bench_selfrag.py", "--device",
                          "cpu" if dry else "cuda"] + (["--quick"] if dry else []))
    out["selfrag_result"] = _newest_json("selfrag_shortform*.json")
    out.update(latency_bench(dry, t0))
    return out


def _release_cuda(dry: bool):
    """Hands this process's cached CUDA blocks back to the driver: an engine
    in a subprocess sizes its KV pool from the free memory."""
    if not dry:
        import gc

        import torch
        gc.collect()
        torch.cuda.empty_cache()


def latency_bench(dry: bool, t0: float) -> dict:
    """bench_latency.py in what is left of the stage's budget; its JSON embedded."""
    left = STAGE_BUDGET_S - (time.time() - t0) - 20      # 20 s for writing the stage result
    _release_cuda(dry)
    if left < 60:
        return {"latency_skipped": f"only {left:.0f} s of the stage's {STAGE_BUDGET_S} s left"}
    # GPU: batch 1 at 128 + 256 tokens, sweep 1..256 at 64 new tokens, 128 of the
    # throughput workload's requests, HF on one padded batch of 32 (+ static cache
    # if time is left); the script skips what does not fit --max-seconds.
    cmd = [sys.executable, "benchmarks/bench_latency.py", "--max-seconds", str(int(left))]
    cmd += (["--dry-run"] if dry else
            ["--sweep-output-len", "64", "--num-requests", "128", "--hf-requests", "32"])
    name = "latency_dryrun.json" if dry else f"latency_{slug(device_name('cuda'))}.json"
    path = os.path.join(REPO, "benchmarks", "results", name)
    started = time.time()
    try:
        res = {"latency": run(cmd, timeout=int(left) + 15)}
    except subprocess.TimeoutExpired as e:
        res = {"latency": {"cmd": " ".join(cmd), "rc": 124, "seconds": round(time.time() - started, 1),
                           "tail": (e.stdout or b"")[-3000:].decode(errors="replace")
                           if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]}}
    # Only this run's file (the script rewrites it after every stage).
    if os.path.exists(path) and os.path.getmtime(path) >= started:
        with open(path) as f:
            res["latency_result"] = {"file": name, "data": json.load(f)}
    return res


def decode_7b(dry: bool):
    """Greedy decode tokens/s of dummy selfrag-7B weights in fp16, batch 1 and 16."""
    import torch

    from engine import LLM, SamplingParams
    if dry:
        import tempfile
        from tests.helpers import BASE
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({**BASE, "model_type": "llama", "max_position_embeddings": 1024}, f)
        model, dev, new = d, "cpu", 4
    else:
        model, dev, new = "selfrag-7b", "cuda", 128
    llm = LLM(model, load_format="dummy", dtype="float16" if dev == "cuda" else "float32",
              device=dev, max_model_len=1024, show_progress=False)
    rows = []
    for bsz in (1, 16):
        prompts = [{"prompt_token_ids": [1] + list(range(100 + i, 100 + i + 127))} for i in range(bsz)]
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rows.append(record(device=device_name(dev), dtype=str(llm.model.dtype).replace("torch.", ""), batch_size=bsz, prompt_len=128,
                           output_len=new, decode_tokens_per_s=bsz * new / dt))
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["tests", "kernels", "e2e", "all"], default="all")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: prove the script")
    args = ap.parse_args()
    stages = ["tests", "kernels", "e2e"] if args.stage == "all" else [args.stage]
    failed = False
    for st in stages:
        res = globals()[f"stage_{st}"](args.dry_run)
        failed |= any(isinstance(v, dict) and v.get("rc", 0) != 0 for v in res.values())
        name = f"gpu_check_{st}{'_dryrun' if args.dry_run else ''}.json"
        for p in write_json(name, record(device=device_name("cpu" if args.dry_run else "cuda"),
                                         stage=st, **res)):
            print("wrote", p)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
