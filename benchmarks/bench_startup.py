"""Start-up cost on the embedded model: `selfrag ask`, `LLM()` and `selfrag serve`.

Each figure is the median of ``--runs`` fresh processes with the model already built,
plus one cold run first (a fresh $SELFRAG_CACHE: the embedded model and its BM25 index
are built then), reported separately:

  ask     wall time and peak RSS of `selfrag ask "What is an alpaca?"` (a whole process:
          Python and torch imports, retriever, model, Self-RAG answer)
  torch   wall time of `python -c "import torch"`, alternated with ask: the floor no
          project code can go under on this machine at this moment
  phases  where an ask's time goes, in a fresh process doing what `selfrag ask` does, phase
          by phase: Python start-up + torch, the project's imports, the BM25 index, the
          model build (LLM()), the Self-RAG answer (generation)
  llm     seconds inside a process for `LLM(default_model_dir())` alone (imports excluded)
  serve   seconds from spawning `selfrag serve --port 0` to the first 200 on /health

Targets (issues 25 and 27): ask <= 2.0 s on a quiet machine and <= import torch + 0.8 s in the
same run, <= 400 MB, LLM() <= 0.3 s, serve ready <= 2.5 s.
Writes benchmarks/results/startup_<cpu>.json.

    python benchmarks/bench_startup.py [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import device_name, record, slug, write_json  # noqa: E402

TARGETS = dict(ask_s=2.0, ask_rss_mb=400, llm_s=0.3, serve_s=2.5)
QUESTION = "What is an alpaca?"


def _env(cache: str) -> dict:
    # The embedded miniature model: this benchmark times start-up, not the 135M default.
    return {**os.environ, "PYTHONPATH": REPO, "SELFRAG_CACHE": cache, "SELFRAG_DEFAULT_MODEL": "miniature"}


def run_ask(cache: str) -> dict:
    """Wall seconds and peak RSS (MB) of one `selfrag ask` process."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "selfrag.cli", "ask", QUESTION, "--device", "cpu"],
                         cwd=REPO, env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"selfrag ask failed: {err[-1000:]}")
    return dict(seconds=wall, rss_mb=usage.ru_maxrss / 1024)


def run_import_torch(cache: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], cwd=REPO, env=_env(cache), check=True)
    return time.perf_counter() - t


# What `selfrag ask QUESTION --device cpu` does (selfrag/cli/ask.py), timed phase by phase.
PHASES_CODE = """
import io, json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from engine.llm import LLM
from selfrag.cli.common import model_context, resolve_model
from selfrag.pipeline import SelfRAG
from selfrag.prompts import canonical_task
from selfrag.retrievers import default_retriever
t2 = time.perf_counter()
canonical_task(None)
path = resolve_model(None, note_stream=io.StringIO())
retriever = default_retriever()
t3 = time.perf_counter()
with model_context(path):
    llm = LLM(path, device="cpu", show_progress=False)
    t4 = time.perf_counter()
    SelfRAG(llm, retriever).answer(sys.argv[1], k=10, mode="adaptive", max_tokens=100)
t5 = time.perf_counter()
print(json.dumps(dict(process_start_s=t0 - float(sys.argv[2]), import_torch_s=t1 - t0,
                      import_project_s=t2 - t1, index_s=t3 - t2, model_build_s=t4 - t3,
                      generation_s=t5 - t4)))
"""


def run_phases(cache: str) -> dict:
    """Seconds of each phase of an ask (``process_start_s``: spawn to the first line)."""
    out = subprocess.run([sys.executable, "-c", PHASES_CODE, QUESTION, repr(time.perf_counter())],
                         cwd=REPO, env=_env(cache), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_llm(cache: str) -> float:
    code = ("import json, time\nfrom selfrag import default_model_dir\nfrom engine import LLM\n"
            "d = default_model_dir()\nt = time.perf_counter()\nLLM(d, device='cpu', show_progress=False)\n"
            "print(json.dumps(time.perf_counter() - t))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(cache), capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_serve(cache: str, timeout: float = 120.0) -> float:
    """Seconds from spawn to the first 200 on /health (port 0: the printed URL says which)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "selfrag.cli", "serve", "--port", "0", "--device", "cpu"],
                         cwd=REPO, env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:
        url = None
        while url is None:
            line = p.stderr.readline()
            if not line:
                raise RuntimeError("serve exited before printing its URL")
            m = re.search(r"on (http://\S+)/v1", line)
            url = m.group(1) if m else None
        while time.perf_counter() - t < timeout:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - t
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("serve did not answer /health in time")
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", help="JSON name in benchmarks/results (default startup_<cpu>.json)")
    args = ap.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="startup_cache_")
    cold = dict(ask=run_ask(cache))                      # builds the model and the BM25 index
    cold.update(llm_s=run_llm(cache), serve_s=run_serve(cache))
    print(f"cold (model and index built first): ask {cold['ask']['seconds']:.2f} s", flush=True)
    asks, torches, phases, llms, serves = [], [], [], [], []
    for i in range(args.runs):
        asks.append(run_ask(cache))
        torches.append(run_import_torch(cache))
        phases.append(run_phases(cache))
        llms.append(run_llm(cache))
        serves.append(run_serve(cache))
        print(f"run {i + 1}: ask {asks[-1]['seconds']:.2f} s {asks[-1]['rss_mb']:.0f} MB (import torch "
              f"{torches[-1]:.2f} s), LLM() {llms[-1]:.3f} s, serve ready {serves[-1]:.2f} s; phases "
              + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in phases[-1].items()), flush=True)
    med = dict(ask_s=statistics.median(a["seconds"] for a in asks),
               ask_rss_mb=statistics.median(a["rss_mb"] for a in asks),
               llm_s=statistics.median(llms), serve_s=statistics.median(serves),
               import_torch_s=statistics.median(torches))
    med_phases = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    ask_over_torch = statistics.median(a["seconds"] - t for a, t in zip(asks, torches))
    met = {k: med[k] <= TARGETS[k] for k in TARGETS}
    met["ask_over_import_torch_le_0_8"] = ask_over_torch <= 0.8
    payload = record(device=device_name("cpu"), python=sys.version.split()[0], runs=args.runs,
                     median=med, ask_phases_median_s=med_phases, ask_minus_import_torch_s=ask_over_torch,
                     targets=TARGETS, targets_met=met, cold_first_run=cold,
                     all_runs=dict(ask=asks, import_torch_s=torches, ask_phases=phases, llm_s=llms,
                                   serve_s=serves),
                     note="medians of fresh processes with the embedded model built; the cold run "
                          "(first, in a fresh SELFRAG_CACHE) builds the model and the BM25 index")
    print("median: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
          + f"; ask - import torch {ask_over_torch:.3f} s; targets met: {met}")
    print("ask phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in med_phases.items()))
    for p in write_json(args.out or f"startup_{slug(device_name('cpu'))}.json", payload):
        print("wrote", p)
    return payload


if __name__ == "__main__":
    main()
