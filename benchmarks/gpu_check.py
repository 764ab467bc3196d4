"""The staged GPU check for longer work: ``make gpu-check-full STAGE=...``.

The first command on a lent GPU is ``make gpu-check`` (benchmarks/gpu_first_contact.py,
one 6-minute run). This older, staged check is for a later command: each stage
stays under 4 minutes (``STAGE_BUDGET_S``), streams its subprocesses' output as it
comes (to stdout and $OUT/gpu_check_<stage>.log), kills them at the budget with
their output kept, and writes one JSON (``$OUT`` and benchmarks/results/):

  tests    the engine test-suite with the engine on CUDA (SELFRAG_TEST_DEVICE=cuda);
  kernels  the Triton kernel tests compiled on the GPU (bf16 too), then
           benchmarks/bench_kernels.py (prefill vs SDPA flash, decode GB/s);
  e2e      greedy decode tokens/s of dummy selfrag-7B weights in fp16 at batch 1
           and 16 (after a same-shape warm-up with other tokens), the Self-RAG
           short-form benchmark on the embedded model, then bench_latency.py in
           what is left (no HF static-cache compile: see hf-static);
  loading  the loading benchmark at the full selfrag-7B shape (writes a 13.5 GB
           bf16 checkpoint to the device's disk first);
  hf-static  bench_latency.py's HF static cache + torch.compile peer alone.

Default (``STAGE`` unset): tests, kernels, e2e. ``--dry-run`` runs the same code
paths on CPU at tiny sizes.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import device_name, record, slug, write_json  # noqa: E402

STAGE_BUDGET_S = 230      # each stage stays under 4 minutes
DEFAULT_STAGES = ["tests", "kernels", "e2e"]
ALL_STAGES = DEFAULT_STAGES + ["loading", "hf-static"]


class Stage:
    def __init__(self, name: str, dry: bool):
        self.name, self.dry, self.t0 = name, dry, time.time()
        out = os.environ.get("OUT")
        self.log_path = os.path.join(out, f"gpu_check_{name}.log") if out else None

    def left(self) -> float:
        return STAGE_BUDGET_S - (time.time() - self.t0)

    def run(self, cmd, env=None, reserve: float = 10.0) -> dict:
        """Runs ``cmd`` with its output streamed line by line; killed (rc 124) when the
        stage's budget minus ``reserve`` runs out. Returns rc, seconds and the tail."""
        limit = max(5.0, self.left() - reserve)
        print("+", " ".join(cmd), f"(limit {limit:.0f} s)", flush=True)
        t = time.time()
        lines: list[str] = []
        log = open(self.log_path, "a", buffering=1) if self.log_path else None
        p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                             start_new_session=True)
        killed = threading.Event()

        def kill():                 # the whole process group, also when it hangs silently
            killed.set()
            os.killpg(p.pid, signal.SIGKILL)
        timer = threading.Timer(limit, kill)
        timer.start()
        try:
            for line in p.stdout:
                print(line, end="", flush=True)
                lines.append(line)
                if log:
                    log.write(line)
        finally:
            timer.cancel()
            p.wait()
            if log:
                log.close()
        rc = 124 if killed.is_set() else p.returncode
        tail = "".join(lines)[-3000:]
        return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t, 1), "tail": tail}


def _newest_json(pattern: str, since: float):
    """benchmarks/results/PATTERN written by this stage (None if none)."""
    paths = [p for p in glob.glob(os.path.join(REPO, "benchmarks", "results", pattern))
             if os.path.getmtime(p) >= since]
    if not paths:
        return None
    path = max(paths, key=os.path.getmtime)
    with open(path) as f:
        return {"file": os.path.basename(path), "data": json.load(f)}


def stage_tests(st: Stage):
    env = {"SELFRAG_TEST_DEVICE": "cpu" if st.dry else "cuda", "PYTHONPATH": REPO}
    args = [sys.executable, "-m", "pytest", "-q", "tests"]
    if st.dry:
        args += ["-x", "-k", "greedy_matches_hf and gqa"]
    return {"pytest": st.run(args, env)}


def stage_kernels(st: Stage):
    """Kernel tests compiled on the GPU (incl. bf16 dot kernels the interpreter can't
    run), then the kernel benchmarks."""
    env = {"PYTHONPATH": REPO, "SELFRAG_TEST_DEVICE": "cuda"}
    out = {}
    if not st.dry:
        out["pytest"] = st.run([sys.executable, "-m", "pytest", "-q", "tests/test_reference_ops.py"]
                               + sorted(glob.glob(os.path.join(REPO, "tests", "test_triton_*.py"))),
                               env, reserve=90)
    else:
        env.update(TRITON_INTERPRET="1", SELFRAG_TEST_DEVICE="cpu")
    out["bench"] = st.run([sys.executable, "benchmarks/bench_kernels.py"] + (["--dry-run"] if st.dry else []),
                          env)
    out["results"] = _newest_json("kernels_*.json", st.t0)
    return out


def stage_e2e(st: Stage):
    out = {"decode": decode_7b(st.dry)}
    _release_cuda(st.dry)      # decode_7b's engine is gone; the subprocesses below need its memory
    out["selfrag"] = st.run([sys.executable, "benchmarks/bench_selfrag.py", "--device",
                             "cpu" if st.dry else "cuda"] + (["--quick"] if st.dry else []), reserve=100)
    out["selfrag_result"] = _newest_json("selfrag_shortform*.json", st.t0)
    out.update(latency_bench(st, ["--skip-hf-static"]))
    return out


def stage_loading(st: Stage):
    load_json = os.path.join(REPO, "benchmarks", "results",
                             "loading_dryrun.json" if st.dry else "loading_cuda_7b.json")
    cmd = [sys.executable, "benchmarks/bench_loading.py", "--repeat", "1", "--cleanup"]
    cmd += (["--size-gb", "0.05", "--device", "cpu"] if st.dry
            else ["--preset", "selfrag-7b", "--device", "cuda"]) + ["--out", load_json]
    out = {"loading": st.run(cmd)}
    out["loading_result"] = _newest_json(os.path.basename(load_json), st.t0)
    return out


def stage_hf_static(st: Stage):
    return latency_bench(st, ["--stages", "hf", "--hf-requests", "0"])


def _release_cuda(dry: bool):
    """Hands this process's cached CUDA blocks back to the driver: an engine
    in a subprocess sizes its KV pool from the free memory."""
    if not dry:
        import gc

        import torch
        gc.collect()
        torch.cuda.empty_cache()


def latency_bench(st: Stage, extra: list[str]) -> dict:
    """bench_latency.py in what is left of the stage's budget; its JSON embedded."""
    left = st.left() - 20
    _release_cuda(st.dry)
    if left < 45:
        return {"latency_skipped": f"only {left:.0f} s of the stage's {STAGE_BUDGET_S} s left"}
    cmd = [sys.executable, "benchmarks/bench_latency.py", "--max-seconds", str(int(left))]
    cmd += (["--dry-run"] if st.dry else
            ["--sweep-output-len", "64", "--num-requests", "128", "--hf-requests", "32"]) + extra
    name = "latency_dryrun.json" if st.dry else f"latency_{slug(device_name('cuda'))}.json"
    started = time.time()
    res = {"latency": st.run(cmd, reserve=5)}
    path = os.path.join(REPO, "benchmarks", "results", name)
    if os.path.exists(path) and os.path.getmtime(path) >= started:
        with open(path) as f:
            res["latency_result"] = {"file": name, "data": json.load(f)}
    return res


def decode_7b(dry: bool):
    """Greedy decode tokens/s of dummy selfrag-7B weights in fp16, batch 1 and 16,
    each after a warm-up at the same shapes with other tokens (no prefix-cache hit)."""
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

    def prompts(bsz, offset):
        return [{"prompt_token_ids": [1] + [3 + (offset + i * 131 + j) % 300 for j in range(127)]}
                for i in range(bsz)]
    rows = []
    for bsz in (1, 16):
        sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        llm.generate(prompts(bsz, 7), sp, use_tqdm=False)              # warm-up, same shapes
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts(bsz, 0), sp, use_tqdm=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        rows.append(record(device=device_name(dev), dtype=str(llm.model.dtype).replace("torch.", ""),
                           batch_size=bsz, prompt_len=128, output_len=new,
                           decode_tokens_per_s=bsz * new / dt, cuda_graphs=llm.cuda_graphs))
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=ALL_STAGES + ["all"], default=None,
                    help="one stage (default: " + ", ".join(DEFAULT_STAGES) + "; all: every stage)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: prove the script")
    args = ap.parse_args()
    stages = (DEFAULT_STAGES if args.stage is None else ALL_STAGES if args.stage == "all"
              else [args.stage])
    failed = False
    for name in stages:
        st = Stage(name, args.dry_run)
        res = globals()[f"stage_{name.replace('-', '_')}"](st)
        failed |= any(isinstance(v, dict) and v.get("rc", 0) != 0 for v in res.values())
        fname = f"gpu_check_{name}{'_dryrun' if args.dry_run else ''}.json"
        for p in write_json(fname, record(device=device_name("cpu" if args.dry_run else "cuda"),
                                          stage=name, seconds=round(time.time() - st.t0, 1), **res)):
            print("wrote", p)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
