"""bench_latency.py's roofline arithmetic: the bytes a decode step reads, the measured
copy bandwidth (the ceiling's denominator), and from both the bandwidth fraction and
the tokens/s ceiling. Pure functions, but ``copy_bandwidth``, which times the device.
"""
from __future__ import annotations

import statistics
import time

import torch


def kv_bytes_per_token(cfg, elem_bytes: int) -> int:
    """K and V of one token over all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem_bytes


def decode_bytes_per_step(weight_bytes: float, kv_per_token: float, batch: int,
                          mean_context: float) -> float:
    """Bytes one decode step reads: every weight once + each sequence's KV cache."""
    return weight_bytes + batch * mean_context * kv_per_token


def bandwidth_fraction(bytes_per_step: float, step_s: float, copy_bytes_per_s: float) -> float:
    """(bytes read per step / step time) as a fraction of the measured copy bandwidth."""
    return bytes_per_step / step_s / copy_bytes_per_s


def ceiling_tokens_per_s(batch: int, copy_bytes_per_s: float, bytes_per_step: float) -> float:
    """Decode tokens/s if every step only streamed its bytes at copy bandwidth."""
    return batch * copy_bytes_per_s / bytes_per_step


def copy_bandwidth(device: str, mib: int, repeat: int) -> dict:
    """Median device-to-device copy of a fp16 buffer; bytes/s counting read + write."""
    n = mib * (1 << 20) // 2
    src = torch.ones(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    cuda = device.startswith("cuda")
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(repeat):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    del src, dst
    return dict(buffer_bytes=2 * n, repeats=repeat, copy_seconds_median=med,
                copy_bytes_per_s=2 * 2 * n / med, copy_gb_per_s=2 * 2 * n / med / 1e9,
                bytes_counted="read + write (2 x buffer)")
