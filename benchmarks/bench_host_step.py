"""Host time per decode step, with the device's work taken out: 7B-shaped metadata on CPU.

What a decode step costs the host (the definition the GPU benchmarks use): schedule +
prepare the inputs + launch the graph or forward + queue the sampler + output
processing. On a GPU the device runs meanwhile; here the model is replaced by a stub
that returns preallocated hidden states and logits, so what is left is the engine's
host work (and the few small torch ops it launches, which run synchronously on CPU:
a 128-wide vocabulary keeps their compute to microseconds).

The metadata has the 7B serving shape: max_model_len 4096 (256-entry block tables),
block size 16, max_num_seqs 256, prompts of ``--prompt-len`` tokens (default 1000, so
tables of ~63 blocks). Batches 1, 64 and 256 decode together; the median wall time of
a step is taken over ``--steps`` steps after a few warm-up steps, for the decode path
a CUDA graph replays (padded to the bucket, the inputs unpacked eagerly here: an
over-estimate of the replay's host cost) and the plain eager path, each through
``generate``'s loop (outputs only at finish) and through ``step()`` (every request's
output every step). One torch thread; Python's GC left as it is.

    python benchmarks/bench_host_step.py [--baseline OLD.json] [--out NAME.json]

``--baseline`` embeds an earlier run (e.g. this script at an older commit) and prints
the ratios. Writes benchmarks/results/host_step_<cpu>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.common import device_name, record, slug, write_json  # noqa: E402

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, model_type="llama")
MAX_SEQS, BLOCK = 256, 16


def stub_engine(model_dir: str, batch: int, prompt_len: int, graph_path: bool):
    """An LLM whose forward and logits are free, holding ``batch`` prefilled requests."""
    from engine import LLM, SamplingParams
    blocks = MAX_SEQS * (-(-(prompt_len + 400) // BLOCK))
    llm = LLM(model_dir, load_format="dummy", device="cpu", max_num_seqs=MAX_SEQS, block_size=BLOCK,
              num_kv_blocks=blocks, show_progress=False, skip_tokenizer_init=True)
    hidden = torch.zeros(max(MAX_SEQS, batch * prompt_len), CONFIG["hidden_size"])
    logits = torch.randn(MAX_SEQS, CONFIG["vocab_size"], generator=torch.Generator().manual_seed(0))
    llm.model.forward = lambda ids, pos, meta, kv: hidden[:ids.shape[0]]
    llm.model.compute_logits = lambda h: logits[:h.shape[0]]
    import engine.worker.cuda_graphs as cg
    if hasattr(cg, "DecodeRunner"):            # persistent decode inputs
        llm.decode_runner = cg.DecodeRunner(llm.model, llm.runner.kv_caches, BLOCK, MAX_SEQS,
                                            llm.max_model_len, pad_to_buckets=graph_path)
    elif graph_path:                           # the list-rebuilding runner (older commits)
        llm.graph_runner = cg.DecodeGraphRunner(llm.model, llm.runner.kv_caches, BLOCK, MAX_SEQS,
                                                llm.max_model_len, use_graphs=False)
    sp = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i in range(batch):
        llm.add_request({"prompt_token_ids": [1] + [3 + (i * 31 + j) % 120 for j in range(prompt_len - 1)]}, sp)
    while llm.scheduler.waiting:
        llm.step()                             # prefills
    return llm


def time_steps(llm, steps: int, api: str) -> dict:
    fn = (lambda: llm.core.step(finished_only=True)) if api == "generate" else llm.step
    for _ in range(20):
        fn()
    before, n0 = dict(llm.step_times), llm.num_steps
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    n = llm.num_steps - n0
    split = {k: (llm.step_times[k] - before[k]) / n * 1e3 for k in llm.step_times}
    return dict(median_ms=statistics.median(ts) * 1e3, p90_ms=sorted(ts)[int(0.9 * len(ts))] * 1e3,
                split_ms=split)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--baseline", help="an earlier run's JSON to compare with")
    ap.add_argument("--out", help="JSON name in benchmarks/results (default host_step_<cpu>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = tempfile.mkdtemp(prefix="host_step_")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        for path in ("graph", "eager"):
            for api in ("generate", "step"):
                llm = stub_engine(d, b, args.prompt_len, path == "graph")
                r = time_steps(llm, args.steps if b < 256 else max(20, args.steps // 3), api)
                rows.append(dict(batch=b, path=path, api=api, **r))
                print(f"batch {b:4d} {path:5s} {api:8s}: {r['median_ms']:7.3f} ms/step "
                      f"(p90 {r['p90_ms']:.3f})  " + " ".join(f"{k} {v:.3f}" for k, v in r["split_ms"].items()),
                      flush=True)
                del llm
    payload = record(device=device_name("cpu"), torch_version=torch.__version__, prompt_len=args.prompt_len,
                     max_model_len=CONFIG["max_position_embeddings"], block_size=BLOCK, max_num_seqs=MAX_SEQS,
                     vocab_for_logits=CONFIG["vocab_size"], rows=rows,
                     definition="median wall ms of one decode step with a stub model: schedule + prepare "
                                "+ launch + sample + wait (the read-back, host work here) + output")
    if args.baseline:
        with open(args.baseline) as f:
            base = json.load(f)
        payload["baseline"] = dict(commit=base.get("commit"), rows=base["rows"])
        key = {(r["batch"], r["path"], r["api"]): r["median_ms"] for r in base["rows"]}
        for r in rows:
            old = key.get((r["batch"], r["path"], r["api"]))
            if old:
                r["baseline_median_ms"] = old
                r["speedup_vs_baseline"] = old / r["median_ms"]
                print(f"batch {r['batch']:4d} {r['path']:5s} {r['api']:8s}: {old:7.3f} -> "
                      f"{r['median_ms']:7.3f} ms ({old / r['median_ms']:.2f}x)")
    name = args.out or f"host_step_{slug(device_name('cpu'))}.json"
    for p in write_json(name, payload):
        print("wrote", p)
    return payload


if __name__ == "__main__":
    main()
