#!/usr/bin/env python
"""Checkpoint loading benchmark: seconds, GB/s and peak RSS of a fresh loader process.

1. Builds (or reuses) a random bf16 Llama checkpoint of about ``--size-gb`` GB in ``--shards``
   safetensors shards in the real HF layout (default shape family: TinyLlama-like, hidden 2048,
   intermediate 5632, 32 heads / 4 kv heads, vocab 32016, layer count chosen to hit the size;
   ``--preset selfrag-7b`` uses the full Self-RAG 7B shape instead).
2. Loads it in a FRESH subprocess so the peak RSS measured is only the loader's:
   ``--target engine``      -> ``engine.model.loader.load_model(dir, dtype=..., device=..., progress=False)``
   ``--target checkpoint``  -> ``engine.model.checkpoint.load_weights`` copying into preallocated tensors.
3. Prints the numbers and writes JSON to ``benchmarks/results/loading_<device>.json``.

The page cache is warm (the checkpoint was just written or read before), so GB/s is a
memory-bandwidth/loader-overhead number, not a disk number.

Examples::

    python benchmarks/bench_loading.py --size-gb 0.2 --target checkpoint
    python benchmarks/bench_loading.py                       # ~2 GB, engine loader, CPU
    python benchmarks/bench_loading.py --device cuda --preset selfrag-7b
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "float32": "float32", "fp32": "float32"}
_DONE_MARKER = ".bench_complete.json"


# ----------------------------------------------------------------------------- checkpoint shape
def pick_config(size_gb: float, preset: str | None):
    from engine.model.config import ModelConfig

    if preset:
        return ModelConfig.from_pretrained(preset).replace(dtype="bfloat16")
    target = size_gb * 1e9
    vocab = 32016
    # Try the ~1B family first, then narrower members if the embeddings alone are too big.
    for hidden, inter, heads, kv in ((2048, 5632, 32, 4), (1024, 2816, 16, 2), (512, 1408, 8, 1), (256, 704, 4, 1)):
        base = ModelConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
            rms_norm_eps=1e-5, max_position_embeddings=4096, dtype="bfloat16", pad_token_id=32015,
        )
        fixed = 2 * (2 * vocab * hidden + hidden)  # embed + lm_head + final norm, bf16
        per_layer = 2 * (base.num_params() - (2 * vocab * hidden + hidden))
        layers = round((target - fixed) / per_layer)
        if layers >= 2:
            return base.replace(num_hidden_layers=layers)
    return base.replace(num_hidden_layers=2)


def checkpoint_bytes(model_dir: str) -> int:
    from engine.model.checkpoint import find_weight_files

    return sum(os.path.getsize(f) for f in find_weight_files(model_dir))


def ensure_checkpoint(model_dir: str, cfg, shards: int, seed: int) -> tuple[int, bool]:
    """Build the random checkpoint unless a complete one for the same config is already there."""
    import torch

    from engine.model.checkpoint import random_state_dict, save_checkpoint
    from engine.model.config import ModelConfig

    marker = os.path.join(model_dir, _DONE_MARKER)
    if os.path.isfile(marker):
        try:
            info = json.load(open(marker))
            if (ModelConfig.from_pretrained(model_dir) == cfg and info.get("shards") == shards
                    and info.get("seed") == seed):
                return checkpoint_bytes(model_dir), True
        except Exception:
            pass
    shutil.rmtree(model_dir, ignore_errors=True)
    t0 = time.perf_counter()
    sd = random_state_dict(cfg, seed=seed, dtype=torch.bfloat16)
    save_checkpoint(model_dir, cfg, sd, num_shards=shards, spelling=4)
    del sd
    with open(marker, "w") as f:
        json.dump({"shards": shards, "seed": seed}, f)
    print(f"built checkpoint in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return checkpoint_bytes(model_dir), False


# ----------------------------------------------------------------------------- child (loader) process
def _rss_now() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child_main(args) -> None:
    import torch

    from engine.model.config import ModelConfig

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    rss_before = _rss_now()  # interpreter + torch imports, before any weights
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()

    if args.target == "engine":
        try:
            from engine.model.loader import load_model
        except ImportError as e:
            sys.exit(f"engine.model.loader.load_model is not available ({e}); use --target checkpoint")
        t0 = time.perf_counter()
        model, cfg = load_model(args.dir, dtype=dtype, device=args.device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
    else:
        from engine.model.checkpoint import load_weights

        cfg = ModelConfig.from_pretrained(args.dir)
        shapes = cfg.weight_shapes()
        t0 = time.perf_counter()
        params = {n: torch.empty(s, dtype=dtype, device=device) for n, s in shapes.items()}

        def consume(name, t):
            params[name].copy_(t, non_blocking=False)

        load_weights(args.dir, shapes, consume, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        n_params = sum(p.numel() for p in params.values())

    out = {
        "seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "rss_before_load_bytes": rss_before,
        "rss_after_load_bytes": _rss_now(),
        "num_params_loaded": n_params,
    }
    if device.type == "cuda":
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_device_name"] = torch.cuda.get_device_name()
    print("BENCH_RESULT " + json.dumps(out))


# ----------------------------------------------------------------------------- parent
def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except Exception:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="approximate checkpoint size in GB (bf16)")
    ap.add_argument("--preset", choices=["selfrag-7b", "selfrag-13b"], default=None,
                    help="use a full built-in shape instead of --size-gb")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="checkpoint directory (default: $TMPDIR/selfrag_bench_<shape>); "
                                                "reused when it already holds a complete checkpoint of that shape")
    ap.add_argument("--target", choices=["engine", "checkpoint"], default="engine")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/loading_<device>.json)")
    ap.add_argument("--repeat", type=int, default=1, help="load N times (fresh process each); best time reported")
    ap.add_argument("--cleanup", action="store_true", help="delete the checkpoint directory afterwards")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = _DTYPES[args.dtype]

    if args.child:
        child_main(args)
        return 0

    cfg = pick_config(args.size_gb, args.preset)
    tag = args.preset or f"h{cfg.hidden_size}_l{cfg.num_hidden_layers}"
    model_dir = args.dir or os.path.join(tempfile.gettempdir(), f"selfrag_bench_{tag}_s{args.shards}")
    model_dir = os.path.abspath(model_dir)
    if model_dir == REPO or model_dir.startswith(REPO + os.sep):
        print(f"warning: {model_dir} is inside the repository; use --cleanup or delete it afterwards",
              file=sys.stderr)
    nbytes, reused = ensure_checkpoint(model_dir, cfg, args.shards, args.seed)
    print(f"checkpoint: {model_dir} ({'reused' if reused else 'new'}), {cfg.num_params() / 1e9:.3f}B params, "
          f"{nbytes / 1e9:.3f} GB, {args.shards} shards, layers={cfg.num_hidden_layers} hidden={cfg.hidden_size}")

    # model size in the *target* dtype (what the loaded model must occupy at minimum)
    import torch
    model_bytes = cfg.num_params() * getattr(torch, args.dtype).itemsize

    runs = []
    for _ in range(max(1, args.repeat)):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dir", model_dir, "--target", args.target,
               "--dtype", args.dtype, "--device", args.device]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        line = next((l for l in r.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
        if r.returncode != 0 or line is None:
            sys.stderr.write(r.stdout + r.stderr)
            print(f"loader subprocess failed (exit {r.returncode})", file=sys.stderr)
            return 1
        runs.append(json.loads(line[len("BENCH_RESULT "):]))
    best = min(runs, key=lambda x: x["seconds"])
    peak = max(x["peak_rss_bytes"] for x in runs)

    device_desc = args.device
    if args.device.startswith("cuda") and best.get("cuda_device_name"):
        device_desc = f"{args.device} ({best['cuda_device_name']})"
    else:
        device_desc = f"{args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    result = {
        "device": device_desc,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "target": args.target,
        "checkpoint_bytes": nbytes,
        "model_bytes": model_bytes,
        "num_params": cfg.num_params(),
        "shards": args.shards,
        "seconds": best["seconds"],
        "gb_per_s": nbytes / best["seconds"] / 1e9,
        "peak_rss_bytes": peak,
        "peak_rss_over_model_size": peak / model_bytes,
        "rss_before_load_bytes": best["rss_before_load_bytes"],
        "peak_rss_minus_baseline_over_model_size": (peak - best["rss_before_load_bytes"]) / model_bytes,
        "dtype": args.dtype,
        "page_cache": "warm",
        "runs": runs,
    }
    if "cuda_max_memory_allocated_bytes" in best:
        result["cuda_max_memory_allocated_bytes"] = best["cuda_max_memory_allocated_bytes"]

    print(f"target={args.target} device={device_desc} dtype={args.dtype}")
    print(f"  seconds            {result['seconds']:.3f}")
    print(f"  GB/s               {result['gb_per_s']:.2f}  (checkpoint bytes / s, warm page cache)")
    print(f"  peak RSS           {peak / 1e9:.3f} GB  "
          f"(baseline before load {best['rss_before_load_bytes'] / 1e9:.3f} GB)")
    print(f"  peak RSS / model   {result['peak_rss_over_model_size']:.2f}  "
          f"(excluding baseline: {result['peak_rss_minus_baseline_over_model_size']:.2f})")
    if "cuda_max_memory_allocated_bytes" in result:
        print(f"  cuda max allocated {result['cuda_max_memory_allocated_bytes'] / 1e9:.3f} GB")

    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"loading_{dev}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {out}")
    if args.cleanup:
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
