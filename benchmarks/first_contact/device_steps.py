"""Steps that need no engine: "probe", "ceilings" and "micro".

probe     versions, the device, which optional packages import, and whether the
          Triton kernels are compiled JITFunctions (on a GPU anything else fails
          the step loudly: the interpreter must never run there).
ceilings  device-to-device copy bandwidth (read + write counted), and cuBLAS M=1
          GEMV bandwidth for the five 7B weight shapes, each timed as a CUDA-graph
          replay of GEMVs over weight copies that span more than 4x the L2
          (benchmarks/device_timing.py: single eager calls measured the launcher,
          51.8 us for the ~10 us ``o`` GEMV), summed into the GEMV ceiling of one
          decode step.
micro     decode attention GB/s at B in {1, 32, 128} x context {512, 4096}, with
          the split count a CUDA graph fixes from max_model_len (4096) next to the
          count picked for the live context: the kernel's work follows the live
          context, so the two should match. Prefill at S=2048 against SDPA flash.
"""
from __future__ import annotations

import importlib
import os
import platform
import sys

import torch

from benchmarks.first_contact.common import summary

OPTIONAL = ("transformers", "safetensors", "sentencepiece", "tokenizers", "hypothesis", "pytest",
            "matplotlib", "numpy", "bm25s", "fastapi", "uvicorn", "aiohttp", "httpx", "tqdm")

# The 7B decode step's weight matrices [N, K] (qkv and gate/up fused, as the engine
# holds them) and how many of each a step reads.
GEMV_SHAPES_7B = {"qkv": (12288, 4096, 32), "o": (4096, 4096, 32), "gate_up": (22016, 4096, 32),
                  "down": (4096, 11008, 32), "lm_head": (32016, 4096, 1)}


def probe(ctx) -> dict:
    import triton

    from kernels.triton.common import launch_kernels, not_compiled
    out = dict(python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
               triton=triton.__version__, torch_cuda=torch.version.cuda,
               TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET"), packages={})
    for name in OPTIONAL:
        try:
            mod = importlib.import_module(name)
            out["packages"][name] = getattr(mod, "__version__", "imported")
        except Exception as e:  # noqa: BLE001 - absent or broken: say which
            out["packages"][name] = f"missing ({type(e).__name__})"
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   total_memory_gib=round(total / 2 ** 30, 2), free_memory_gib=round(free / 2 ** 30, 2),
                   l2_cache_mb=round(getattr(p, "L2_cache_size", 0) / 1e6, 1))
    else:
        out.update(device=f"cpu ({platform.machine()}, {os.cpu_count()} cores)")
    kernels = launch_kernels()
    bad = not_compiled()
    out.update(kernels=len(kernels), kernels_not_compiled=bad)
    ctx.log(f"   {out['device']}: torch {out['torch']}, triton {out['triton']}, "
            f"{len(kernels) - len(bad)}/{len(kernels)} kernels compiled")
    if ctx.cuda and bad:
        raise RuntimeError(f"on CUDA these kernels are not compiled JITFunctions: {bad} "
                           f"(TRITON_INTERPRET={out['TRITON_INTERPRET']!r})")
    return out


def copy_bandwidth(ctx, nbytes: int) -> dict:
    src = torch.randn(nbytes // 2, dtype=torch.float16, device=ctx.device)
    dst = torch.empty_like(src)
    ts = ctx.time_device(lambda: dst.copy_(src), reps=10 if ctx.cuda else 3)
    s = summary(ts)
    src = dst = None                            # freed before the next allocation
    return dict(buffer_bytes=nbytes, bytes_counted="read + write", seconds=s,
                bytes_per_s=2 * nbytes / s["median"], gb_per_s=2 * nbytes / s["median"] / 1e9)


def ceilings(ctx) -> dict:
    from benchmarks.device_timing import l2_bytes, rotating_copies
    dt = torch.float16 if ctx.cuda else torch.float32
    copy = copy_bandwidth(ctx, (1 << 30) if ctx.cuda else (16 << 20))
    ctx.shared["copy_bytes_per_s"] = copy["bytes_per_s"]
    ctx.log(f"   copy: {copy['gb_per_s']:.0f} GB/s")
    shapes = GEMV_SHAPES_7B if not ctx.dry else {k: (n // 64, kk // 64, c) for k, (n, kk, c) in
                                                  GEMV_SHAPES_7B.items()}
    l2 = l2_bytes(ctx.device)
    rows, step_s = {}, 0.0
    for name, (N, K, count) in shapes.items():
        nbytes = N * K * dt.itemsize
        # Copies of the weight that together span > 4x the L2, one GEMV on each, all in one
        # graph: every call streams its weight from HBM with no launch gap, as in a step.
        ws = rotating_copies(lambda N=N, K=K: torch.randn(N, K, dtype=dt, device=ctx.device), nbytes, ctx.device)
        x = torch.randn(1, K, dtype=dt, device=ctx.device)
        fns = [lambda w=w: torch.nn.functional.linear(x, w) for w in ws]
        s = summary(ctx.time_graphed(fns, reps=20 if ctx.cuda else 3))
        rows[name] = dict(N=N, K=K, per_step=count, copies=len(ws), seconds=s, gb_per_s=nbytes / s["median"] / 1e9,
                          fraction_of_copy=nbytes / s["median"] / copy["bytes_per_s"])
        step_s += count * s["median"]
        ctx.log(f"   gemv {name:8s} [{N}x{K}]: {rows[name]['gb_per_s']:7.0f} GB/s "
                f"({100 * rows[name]['fraction_of_copy']:.0f}% of copy; {len(ws)} copies in one graph)")
        ws = x = fns = None                       # freed before the next shape
    gemv_rows, gemv_table = gemv_sweep(ctx, shapes, dt, copy["bytes_per_s"])
    weight_bytes = sum(n * k * c for n, k, c in shapes.values()) * dt.itemsize
    ctx.shared["gemv_step_s"] = step_s
    out = dict(copy=copy, gemv=rows, ours_vs_library=gemv_rows, gemv_table=gemv_table,
               gemv_step_s=step_s, gemv_ceiling_tokens_per_s=1 / step_s,
               step_weight_bytes=weight_bytes, l2_bytes=l2,
               copy_ceiling_tokens_per_s=copy["bytes_per_s"] / weight_bytes,
               note="a 7B decode step's weights (no embedding table: a step gathers one row); "
                    "GEMV ceiling = 1 / (sum of each matrix's cuBLAS M=1 time x its count), each time "
                    "a CUDA-graph replay of GEMVs on weight copies spanning > 4x the L2, per call")
    ctx.log(f"   ceilings at batch 1: copy {out['copy_ceiling_tokens_per_s']:.0f} tok/s, "
            f"GEMV {out['gemv_ceiling_tokens_per_s']:.0f} tok/s")
    return out


SWEEP_ROWS = (1, 16)         # the decode GEMV's smallest and largest row counts


def gemv_sweep(ctx, shapes: dict, dt, copy_bytes_per_s: float) -> tuple[list, dict]:
    """Our decode GEMV (kernels/triton/gemv.py) against the library path it would replace,
    per 7B matrix at 1 and 16 rows: cuBLAS for the model-dtype weights, the split-K w8a16
    kernel for int8 ones (not the head: it is never quantized). Each timing is a graph
    replay over weight copies spanning > 4x the L2, as the cuBLAS ceilings above.

    Returns (rows, table): a row per (weights, matrix, M) with both times and GB/s, and
    the entry for ``kernels/gemv_table.json``: per weight kind and NxK, the largest swept
    row count up to which ours was faster at every swept count (absent: never)."""
    from benchmarks.device_timing import rotating_copies
    from kernels.triton.activation import silu_and_mul
    from kernels.triton.gemv import gemv, silu_mul_gemv
    from kernels.triton.w8a16 import w8a16_linear
    kind = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dt, "fp32")
    sweep_rows = SWEEP_ROWS
    if ctx.dry:     # the interpreter runs each program in Python: one small matrix proves the path
        shapes, sweep_rows = {"down": shapes["down"]}, (1, 2)     # down: plain and fused
    rows, table = [], {}
    for weights in (kind, "int8"):
        for name, (N, K, _) in shapes.items():
            if weights == "int8" and name == "lm_head":
                continue
            if weights == "int8":
                nbytes = N * K + 4 * N

                def make(N=N, K=K):
                    return (torch.randint(-127, 128, (N, K), dtype=torch.int8, device=ctx.device),
                            torch.rand(N, device=ctx.device) / 127)
                library = lambda x, w: w8a16_linear(x, *w)              # noqa: E731
                ours = lambda x, w: gemv(x, *w)                         # noqa: E731
                fused = lambda gu, w: silu_mul_gemv(gu, *w)             # noqa: E731
            else:
                nbytes = N * K * dt.itemsize

                def make(N=N, K=K):
                    return torch.randn(N, K, dtype=dt, device=ctx.device)
                library = lambda x, w: torch.nn.functional.linear(x, w)  # noqa: E731
                ours = lambda x, w: gemv(x, w)                          # noqa: E731
                fused = lambda gu, w: silu_mul_gemv(gu, w)              # noqa: E731
            ws = [make()] if ctx.dry else rotating_copies(make, nbytes, ctx.device)
            # down also with its activation fused (silu_mul_gemv on gate_up [M, 2K]) against
            # silu_and_mul, then the library matmul: the fusion is kept only where it wins
            for fusion in ((None, "silu_mul") if name == "down" else (None,)):
                _sweep_one(ctx, rows, table, weights, kind, name, N, K, nbytes, ws, sweep_rows, dt,
                           library if fusion is None else (lambda gu, w: library(silu_and_mul(gu), w)),
                           ours if fusion is None else fused, fusion, copy_bytes_per_s)
            ws = None                                                  # freed before the next shape
    device = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu"
    return rows, {device: table}


def _sweep_one(ctx, rows, table, weights, kind, name, N, K, nbytes, ws, sweep_rows, dt, library, ours, fusion,
               copy_bytes_per_s) -> None:
    """One matrix (and fusion) at each swept row count: both paths timed, a row each, and
    the table entry when ours won up to some row count."""
    wins = []
    for M in sweep_rows:
        x = torch.randn(M, 2 * K if fusion else K, dtype=dt, device=ctx.device)
        t = {}
        for who, fn in (("library", library), ("ours", ours)):
            t[who] = summary(ctx.time_graphed([lambda w=w, fn=fn: fn(x, w) for w in ws],
                                              reps=20 if ctx.cuda else 1))["median"]
        wins.append(t["ours"] < t["library"])
        rows.append(dict(weights=weights, matrix=name, fusion=fusion, N=N, K=K, M=M,
                         library_s=t["library"], ours_s=t["ours"], ours_over_library=t["library"] / t["ours"],
                         ours_gb_per_s=nbytes / t["ours"] / 1e9,
                         ours_fraction_of_copy=nbytes / t["ours"] / copy_bytes_per_s))
        ctx.log(f"   {weights} {name + ('+' + fusion if fusion else ''):8s} M={M:2d}: ours "
                f"{nbytes / t['ours'] / 1e9:6.0f} GB/s, "
                f"{'cuBLAS' if weights == kind else 'w8a16'} {nbytes / t['library'] / 1e9:6.0f} GB/s "
                f"({t['library'] / t['ours']:.2f}x)")
    up_to = 0
    for M, won in zip(sweep_rows, wins):
        if not won:
            break
        up_to = M
    if up_to:
        table.setdefault(weights, {})[f"{fusion}:{N}x{K}" if fusion else f"{N}x{K}"] = up_to


def micro(ctx) -> dict:
    """Decode attention (graph split count vs live) and prefill vs SDPA."""
    from benchmarks.bench_kernels import paged
    from benchmarks.device_timing import l2_bytes, rotation_count
    from kernels import triton_ops
    from kernels.metadata import AttentionMetadata
    from kernels.triton.decode_attention import pick_num_splits, sm_count
    dev, dt = ctx.device, (torch.float16 if ctx.cuda else torch.float32)
    if ctx.dry:
        # one batch and context per head count: the dry run proves the paths, it times nothing
        Hq, D, batches, contexts, graph_len, prefill_S = 4, 16, [2], [48], 256, 64
    else:
        Hq, D, batches, contexts, graph_len, prefill_S = 32, 128, [1, 32, 128], [512, 4096], 4096, 2048
    sms = sm_count(torch.device(dev))
    l2 = l2_bytes(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    copy_bw = ctx.shared.get("copy_bytes_per_s")
    rows = []
    for Hkv in (Hq, Hq // 4):
        for B in batches:
            for C in contexts:
                kv_bytes = 2 * B * C * Hkv * D * dt.itemsize
                # Distinct caches, together > 4x the L2, so that the graph's back-to-back
                # calls stream from HBM as a decode step's layers do.
                n_sets = 1 if ctx.dry else min(128, rotation_count(kv_bytes, l2))
                sets = []
                for _ in range(n_sets):
                    kc, vc, tables = paged(B, C, Hkv, D, 16, dt, dev, gen)
                    q = torch.randn(B, Hq, D, dtype=dt, device=dev, generator=gen)
                    wide = torch.zeros(B, -(-graph_len // 16), dtype=torch.int32, device=dev)
                    wide[:, :tables.shape[1]] = tables          # a graph's table width
                    meta = AttentionMetadata(False, torch.empty(0, dtype=torch.int64, device=dev),
                                             wide, torch.full((B,), C, dtype=torch.int32, device=dev),
                                             torch.arange(B + 1, dtype=torch.int32, device=dev), 1, C)
                    sets.append((q, kc, vc, meta))
                row = dict(batch=B, context=C, kv_heads=Hkv, kv_bytes=kv_bytes, kv_sets=n_sets)
                for label, splits in (("graph", pick_num_splits(B, Hkv, graph_len, 16, sms)),
                                      ("live", pick_num_splits(B, Hkv, C, 16, sms))):
                    fns = [lambda a=a, splits=splits: triton_ops.decode_attention(
                        a[0], a[1], a[2], a[3], D ** -0.5, num_splits=splits) for a in sets]
                    s = summary(ctx.time_graphed(fns, reps=20 if ctx.cuda else 2))
                    row[label] = dict(num_splits=splits, seconds=s, gb_per_s=kv_bytes / s["median"] / 1e9,
                                      fraction_of_copy=kv_bytes / s["median"] / copy_bw if copy_bw else None)
                row["graph_over_live_time"] = row["graph"]["seconds"]["median"] / row["live"]["seconds"]["median"]
                rows.append(row)
                ctx.log(f"   decode B={B:3d} C={C:5d} Hkv={Hkv:2d}: live {row['live']['gb_per_s']:7.1f} GB/s "
                        f"({row['live']['num_splits']} splits), graph {row['graph']['gb_per_s']:7.1f} GB/s "
                        f"({row['graph']['num_splits']} splits)")
                sets = fns = None                      # freed before the next size
    from benchmarks.bench_kernels import bench_prefill
    prefill = bench_prefill(dev, [prefill_S], Hq, D, dt, triton_ops)
    return dict(decode=rows, prefill=prefill)
