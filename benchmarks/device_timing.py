"""Timing device work the way a decode step runs it: back to back inside one CUDA graph,
on inputs that together stream from memory rather than from the L2 cache.

Why not single eager calls after an L2 flush (what the first GPU check did): for a
kernel of ~10 us, launching it costs as much as running it, so an eager call measures
the launcher. The first H200 check timed the 4096 x 4096 ``o`` GEMV at 51.8 us that way,
against ~10 us inside the decode graph, and then reported decode at 126% of its "GEMV
ceiling". Timing a graph replay removes the launch cost; giving each call of the graph
its own copy of the big operand, together more than ``L2_FACTOR`` times the L2, makes
every call read its operand from HBM, as every layer of a real step does.

    copies = rotating_copies(lambda: torch.randn(N, K, ...), N * K * 2, device)
    secs = time_graphed([lambda w=w: F.linear(x, w) for w in copies], device)

``time_graphed`` returns seconds per call (each replay's CUDA-event time divided by the
number of calls in the graph). On CPU (the dry runs) it times the calls in turn with
``perf_counter``: the same code path, numbers without meaning.
"""
from __future__ import annotations

import time

import torch

L2_FACTOR = 4              # the copies of an operand together span more than 4x the L2
CPU_L2_BYTES = 64 << 10    # the dry runs' stand-in: a few small copies


def l2_bytes(device) -> int:
    """The device's L2 cache in bytes (H100: 50 MB, H200: 60 MB); the CPU stand-in elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return CPU_L2_BYTES


def rotation_count(nbytes: int, l2: int, factor: int = L2_FACTOR) -> int:
    """Copies of an ``nbytes`` operand that together exceed ``factor`` x ``l2`` bytes (one
    when the operand alone does: by the time a call comes back to its first bytes, the
    cache holds only the last 1/factor of it)."""
    if nbytes <= 0:
        raise ValueError(f"rotation_count: nbytes must be positive, got {nbytes}")
    return factor * l2 // nbytes + 1


def rotating_copies(make, nbytes: int, device, factor: int = L2_FACTOR) -> list:
    """``make()`` called once per copy: rotation_count(nbytes, l2_bytes(device)) operands."""
    return [make() for _ in range(rotation_count(nbytes, l2_bytes(device), factor))]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device, reps: int = 20, warmup: int = 3) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones: CUDA
    events around each call on a GPU, ``perf_counter`` on CPU."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def time_graphed(fns: list, device, reps: int = 20) -> list[float]:
    """Seconds per call of ``fns`` run back to back: on CUDA all captured in one graph
    (after one eager call each on a side stream, where Triton compiles and the
    allocator settles), each replay timed with CUDA events and divided by len(fns).
    On CPU: each round of the fns in turn, timed by the wall clock, divided the same way."""
    if not fns:
        raise ValueError("time_graphed: no calls to time")
    if torch.device(device).type != "cuda":
        return [t / len(fns) for t in time_calls(lambda: [f() for f in fns], device, reps)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    try:
        return [t / len(fns) for t in time_calls(graph.replay, device, reps)]
    finally:
        del graph                     # its memory pool goes back before the next shape
