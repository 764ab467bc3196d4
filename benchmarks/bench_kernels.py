"""Kernel benchmarks (the GPU check's `kernels` stage).

* Prefill attention: causal, one sequence of S tokens, 32 heads, head_dim 128,
  fp16, K/V read through the paged cache. TFLOP/s (4*S*S*H*D/2 causal flops)
  against ``scaled_dot_product_attention`` with the flash backend on
  contiguous q/k/v, measured in the same run.
* Paged decode attention: batch B x context C, 32 heads (MHA and GQA 32/8),
  head_dim 128, fp16. GB/s of K/V read, against the naive PyTorch paged
  reference (``kernels.reference.decode_attention``) and as a fraction of the
  device-to-device copy bandwidth measured in the same run.
* W8A16 GEMV (benchmarks/kernels_w8a16.py): int8 weights on the 7B's five weight
  shapes at M = 1, 4, 16, GB/s against cuBLAS's fp16 matmul in the same run, both timed
  as CUDA-graph replays over weight copies spanning more than 4x the L2
  (benchmarks/device_timing.py).

Writes benchmarks/results/kernels_<device>.json (and $OUT) and a PNG.
``--dry-run`` runs the same code paths at tiny sizes on CPU (Triton's
interpreter; the numbers mean nothing there).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.common import RESULTS, device_name, record, slug, write_json  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.metadata import AttentionMetadata  # noqa: E402


def timeit(fn, dev: str, reps: int = 20) -> float:
    """Median seconds of ``fn`` (CUDA events on GPU)."""
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median") / 1e3
    ts = []
    for _ in range(max(1, reps // 10)):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth(dev: str, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=dev)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), dev)
    return 2 * nbytes / t


def paged(B, ctx, Hkv, D, bs, dtype, dev, gen):
    """A paged K/V cache holding B sequences of ``ctx`` tokens in shuffled blocks."""
    nblk = -(-ctx // bs)
    num_blocks = B * nblk
    k = torch.randn(num_blocks, bs, Hkv, D, dtype=dtype, device=dev, generator=gen)
    v = torch.randn(num_blocks, bs, Hkv, D, dtype=dtype, device=dev, generator=gen)
    perm = torch.randperm(num_blocks, device="cpu", generator=torch.Generator().manual_seed(0))
    tables = perm.view(B, nblk).to(torch.int32).to(dev)
    return k, v, tables


def bench_prefill(dev, sizes, H, D, dtype, triton_ops):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for S in sizes:
        q = torch.randn(S, H, D, dtype=dtype, device=dev, generator=gen)
        kc, vc, tables = paged(1, S, H, D, 16, dtype, dev, gen)
        meta = AttentionMetadata(True, torch.empty(0, dtype=torch.int64, device=dev), tables,
                                 torch.tensor([S], dtype=torch.int32, device=dev),
                                 torch.tensor([0, S], dtype=torch.int32, device=dev), S, S)
        scale = D ** -0.5
        t_ours = timeit(lambda: triton_ops.prefill_attention(q, kc, vc, meta, scale), dev)
        # baseline: SDPA (flash on GPU) over contiguous tensors of the same data
        k = kc[tables[0].long()].flatten(0, 1)[:S].transpose(0, 1).unsqueeze(0)
        v = vc[tables[0].long()].flatten(0, 1)[:S].transpose(0, 1).unsqueeze(0)
        qq = q.transpose(0, 1).unsqueeze(0)
        backend = SDPBackend.FLASH_ATTENTION if dev == "cuda" else SDPBackend.MATH

        def sdpa():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qq, k, v, is_causal=True)
        t_sdpa = timeit(sdpa, dev)
        flops = 4 * S * S * H * D / 2
        rows.append(dict(kernel="prefill_attention", seq_len=S, heads=H, head_dim=D,
                         tflops=flops / t_ours / 1e12, sdpa_tflops=flops / t_sdpa / 1e12,
                         ratio_vs_sdpa=t_sdpa / t_ours))
        print(f"prefill S={S:5d}: {rows[-1]['tflops']:7.1f} TFLOP/s vs SDPA "
              f"{rows[-1]['sdpa_tflops']:7.1f} ({rows[-1]['ratio_vs_sdpa']:.2f}x)", flush=True)
    return rows


def bench_decode(dev, batches, contexts, Hq, Hkv, D, dtype, triton_ops, copy_bw, naive_cap):
    rows = []
    gen = torch.Generator(device=dev).manual_seed(1)
    for B in batches:
        for C in contexts:
            kc, vc, tables = paged(B, C, Hkv, D, 16, dtype, dev, gen)
            q = torch.randn(B, Hq, D, dtype=dtype, device=dev, generator=gen)
            meta = AttentionMetadata(False, torch.empty(0, dtype=torch.int64, device=dev), tables,
                                     torch.full((B,), C, dtype=torch.int32, device=dev),
                                     torch.arange(B + 1, dtype=torch.int32, device=dev), 1, C)
            scale = D ** -0.5
            t = timeit(lambda: triton_ops.decode_attention(q, kc, vc, meta, scale), dev)
            kv_bytes = 2 * B * C * Hkv * D * kc.element_size()
            row = dict(kernel="decode_attention", batch_size=B, context=C, heads=Hq, kv_heads=Hkv,
                       head_dim=D, gb_per_s=kv_bytes / t / 1e9,
                       bandwidth_fraction=(kv_bytes / t) / copy_bw if copy_bw else None)
            if kv_bytes <= naive_cap:
                tn = timeit(lambda: reference.decode_attention(q, kc, vc, meta, scale), dev)
                row.update(naive_gb_per_s=kv_bytes / tn / 1e9, speedup_vs_naive=tn / t)
            rows.append(row)
            print(f"decode B={B:3d} C={C:5d} Hkv={Hkv:2d}: {row['gb_per_s']:7.1f} GB/s "
                  f"({100 * (row['bandwidth_fraction'] or 0):.0f}% of copy)"
                  + (f", {row['speedup_vs_naive']:.1f}x naive" if "speedup_vs_naive" in row else ""),
                  flush=True)
            kc = vc = None   # free before the next size is allocated
    return rows


def plot(prefill, decode, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return None
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ax[0].plot([r["seq_len"] for r in prefill], [r["tflops"] for r in prefill], "o-", label="ours")
    ax[0].plot([r["seq_len"] for r in prefill], [r["sdpa_tflops"] for r in prefill], "s--", label="SDPA")
    ax[0].set(xscale="log", xlabel="sequence length", ylabel="TFLOP/s", title="prefill attention (causal)")
    ax[0].legend()
    for hkv in sorted({r["kv_heads"] for r in decode}):
        for C in sorted({r["context"] for r in decode}):
            rs = [r for r in decode if r["context"] == C and r["kv_heads"] == hkv]
            ax[1].plot([r["batch_size"] for r in rs], [r["gb_per_s"] for r in rs], "o-",
                       label=f"ctx {C}, kv heads {hkv}")
    ax[1].set(xscale="log", xlabel="batch size", ylabel="GB/s (K/V read)", title="paged decode attention")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    dev = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kernels import triton_ops
    dtype = torch.float16 if dev == "cuda" else torch.float32
    if args.dry_run:
        H, D, prefill_sizes, batches, contexts = 2, 16, [32], [1, 2], [48]
    else:
        H, D, prefill_sizes = 32, 128, [512, 1024, 2048, 4096, 8192]
        batches, contexts = [1, 8, 32, 128], [512, 2048, 8192]
    copy_bw = copy_bandwidth(dev, (1 << 30) if dev == "cuda" else (1 << 20))
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s", flush=True)
    prefill = bench_prefill(dev, prefill_sizes, H, D, dtype, triton_ops)
    decode = []
    for hkv in (H, max(1, H // 4)):
        decode += bench_decode(dev, batches, contexts, H, hkv, D, dtype, triton_ops, copy_bw,
                               naive_cap=(4 << 30) if dev == "cuda" else (1 << 30))
    from benchmarks.kernels_w8a16 import ROWS, SHAPES_7B, bench_w8a16
    w8 = bench_w8a16(dev, [("dry", 96, 160), ("dry_k", 64, 300)] if args.dry_run else SHAPES_7B,
                     (1, 4) if args.dry_run else ROWS, dtype, copy_bw)
    name = "kernels_dryrun" if args.dry_run else "kernels_" + slug(device_name(dev))
    payload = record(device=device_name(dev), dtype=str(dtype).replace("torch.", ""),
                     copy_bandwidth_gb_per_s=copy_bw / 1e9, prefill=prefill, decode=decode, w8a16=w8)
    for p in write_json(name + ".json", payload, to_out=False):   # gpu_check embeds it
        print("wrote", p)
    png = plot(prefill, decode, os.path.join(RESULTS, name + ".png"))
    if png and os.environ.get("OUT"):
        import shutil
        shutil.copy(png, os.environ["OUT"])


if __name__ == "__main__":
    main()
