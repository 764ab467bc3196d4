"""bench_kernels.py's W8A16 part: the int8 split-K kernel (kernels/triton/w8a16.py) on the 7B's
five weight shapes at M = 1, 4 and 16 rows, against cuBLAS's fp16 matmul of the same
shape measured in the same run, and the decode GEMV (kernels/triton/gemv.py) on the same
weights, int8 and fp16, beside both.

GB/s counts the bytes each must move at least: the weight (int8 + fp32 scales, or
fp16), the activations read and the output written. ``aggregate_m1``: the five shapes'
bytes over their summed times at M = 1, a decode step's mix, also as a fraction of the
device-to-device copy bandwidth (issue 19's target: >= 0.75). All three row counts run
the split-K kernel (16-row tiles); above 256 rows the launcher dequantizes and calls cuBLAS.
"""
from __future__ import annotations

import statistics

import torch

# (name, N, K) of the 7B's matrices: qkv, o, gate_up, down and the (unquantized) lm_head
SHAPES_7B = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008),
             ("lm_head", 32016, 4096)]
ROWS = (1, 4, 16)


def bench_w8a16(dev, shapes, rows, dtype, copy_bw) -> dict:
    """Each (shape, M): the int8 kernel and cuBLAS's fp16 matmul, each timed as a CUDA-graph
    replay of calls over weight copies that together span more than 4x the L2
    (benchmarks/device_timing.py), as a decode step's layers run them: no launch cost, every
    call streaming its weight from memory."""
    from benchmarks.device_timing import rotating_copies, time_graphed
    from kernels import triton_ops
    out, agg = [], {"int8": [0, 0.0], "fp16": [0, 0.0]}
    g = torch.Generator(device=dev).manual_seed(0)
    reps = 20 if torch.device(dev).type == "cuda" else 2
    for name, N, K in shapes:
        def make(N=N, K=K):
            w = (torch.randn(N, K, generator=g, device=dev) * 0.02).to(dtype)
            q = torch.empty(N, K, dtype=torch.int8, device=dev)
            s = torch.empty(N, dtype=torch.float32, device=dev)
            triton_ops.quantize_int8(w, q, s)
            return w, q, s
        # as many copies as the int8 weights need; the fp16 ones span twice that
        copies = rotating_copies(make, N * K, dev)
        for M in rows:
            x = torch.randn(M, K, generator=g, device=dev).to(dtype)
            io = (M * K + M * N) * x.element_size()
            t8 = statistics.median(time_graphed([lambda q=q, s=s: triton_ops.w8a16_linear(x, q, s)
                                                 for _, q, s in copies], dev, reps))
            t16 = statistics.median(time_graphed([lambda w=w: x @ w.t() for w, _, _ in copies], dev, reps))
            b8, b16 = N * K + 4 * N + io, N * K * dtype.itemsize + io
            # the decode GEMV (kernels/triton/gemv.py) on the same copies, int8 and fp16
            g8 = statistics.median(time_graphed([lambda q=q, s=s: triton_ops.gemv(x, q, s)
                                                 for _, q, s in copies], dev, reps))
            g16 = statistics.median(time_graphed([lambda w=w: triton_ops.gemv(x, w) for w, _, _ in copies],
                                                 dev, reps))
            out.append(dict(matrix=name, N=N, K=K, M=M, copies=len(copies), int8_us=t8 * 1e6, fp16_us=t16 * 1e6,
                            int8_gb_per_s=b8 / t8 / 1e9, fp16_gb_per_s=b16 / t16 / 1e9,
                            int8_copy_fraction=b8 / t8 / copy_bw, speedup_vs_fp16=t16 / t8,
                            gemv_int8_us=g8 * 1e6, gemv_fp16_us=g16 * 1e6, gemv_int8_gb_per_s=b8 / g8 / 1e9,
                            gemv_fp16_gb_per_s=b16 / g16 / 1e9, gemv_fp16_vs_cublas=t16 / g16,
                            gemv_int8_vs_w8a16=t8 / g8))
            print(f"  gemv  {name:8s} M={M:2d}: int8 {g8 * 1e6:8.1f} us {b8 / g8 / 1e9:7.0f} GB/s | "
                  f"fp16 {g16 * 1e6:8.1f} us {b16 / g16 / 1e9:7.0f} GB/s | vs w8a16 {t8 / g8:.2f}x, "
                  f"vs cuBLAS {t16 / g16:.2f}x", flush=True)
            if M == 1:
                agg["int8"][0] += b8
                agg["int8"][1] += t8
                agg["fp16"][0] += b16
                agg["fp16"][1] += t16
            print(f"  w8a16 {name:8s} M={M:2d}: int8 {t8 * 1e6:8.1f} us {b8 / t8 / 1e9:7.0f} GB/s | "
                  f"fp16 cuBLAS {t16 * 1e6:8.1f} us {b16 / t16 / 1e9:7.0f} GB/s | {t16 / t8:.2f}x", flush=True)
        del copies
    a8, a16 = agg["int8"][0] / agg["int8"][1], agg["fp16"][0] / agg["fp16"][1]
    res = dict(rows=out, aggregate_m1=dict(int8_gb_per_s=a8 / 1e9, int8_copy_fraction=a8 / copy_bw,
                                           fp16_gb_per_s=a16 / 1e9, fp16_copy_fraction=a16 / copy_bw,
                                           speedup_vs_fp16=agg["fp16"][1] / agg["int8"][1]))
    print(f"  w8a16 aggregate at M=1: {a8 / 1e9:.0f} GB/s ({a8 / copy_bw:.2f} of copy; target 0.75), "
          f"fp16 cuBLAS {a16 / 1e9:.0f} GB/s; step speedup {res['aggregate_m1']['speedup_vs_fp16']:.2f}x",
          flush=True)
    return res
