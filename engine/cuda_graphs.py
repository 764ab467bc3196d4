"""CUDA graphs for the decode step: one graph per batch-size bucket.

A decode step launches ~10 kernels per layer; at batch 1 on a 7B model the
launches alone would cost more than the 4-5 ms the weights take to stream.
So decode runs as a replayed CUDA graph: at start-up one graph per bucket
(1, 2, 4, 8, 16, 32, ... up to ``max_num_seqs``) is captured into a shared
memory pool, each reading its inputs from static buffers. A step with B
sequences pads to the smallest bucket >= B: padding rows get slot -1 (the
KV write skips them), context length 0 (attention returns zeros) and token 0,
and their logits are dropped. Prefill, and any batch larger than the largest
bucket, runs eagerly.

The bucket choice and the padding are plain functions, tested on CPU; the same
static-buffer path also runs eagerly (``use_graphs=False``) so it is testable
without a GPU. Capture needs CUDA and the Triton backend (the reference ops
read tensors back to the host, which a graph cannot contain).
"""
from __future__ import annotations

import sys
import time

import torch

from kernels.metadata import AttentionMetadata


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Powers of two up to ``max_num_seqs``, plus ``max_num_seqs`` itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max_num_seqs]


def pick_bucket(batch: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``batch`` sequences; None if none does."""
    for b in buckets:
        if b >= batch:
            return b
    return None


def pad_decode_batch(host: dict, bucket: int, max_blocks: int) -> dict:
    """Pads a decode batch's host lists (``ModelRunner.host_batch``) to ``bucket`` rows.

    Padding rows: token 0 at position 0, slot -1 (no KV write), context 0 (no
    attention), an all-zero block table. Block tables are padded to
    ``max_blocks`` columns, the static buffer's width.
    """
    B = len(host["ctx"])
    if B > bucket:
        raise ValueError(f"batch {B} does not fit bucket {bucket}")
    pad = bucket - B
    tables = [list(t) + [0] * (max_blocks - len(t)) for t in host["tables"]]
    if any(len(t) > max_blocks for t in host["tables"]):
        raise ValueError(f"a block table is wider than the graph's {max_blocks} blocks")
    return dict(input_ids=host["input_ids"] + [0] * pad, positions=host["positions"] + [0] * pad,
                slots=host["slots"] + [-1] * pad, ctx=host["ctx"] + [0] * pad,
                tables=tables + [[0] * max_blocks] * pad)


class DecodeGraphRunner:
    """Static buffers, per-bucket metadata and (on CUDA) captured graphs."""

    def __init__(self, model, kv_caches, block_size: int, max_num_seqs: int, max_model_len: int,
                 num_splits=None, use_graphs: bool = True):
        self.model, self.kv_caches = model, kv_caches
        self.device = model.device
        self.buckets = graph_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.use_graphs = use_graphs
        n, dev = self.buckets[-1], self.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.ctx = torch.zeros(n, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=dev)
        # num_splits: None, an int, or a function of the bucket size
        self.num_splits = num_splits if callable(num_splits) else (lambda b: num_splits)
        self.metas = {b: self._meta(b) for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        # max_context_len is the graph's bound, not a step's: the kernels read
        # the real lengths from ctx on the device.
        return AttentionMetadata(False, self.slots[:b], self.tables[:b], self.ctx[:b],
                                 self.qsl[:b + 1], 1, self.max_model_len,
                                 num_splits=self.num_splits(b))

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model.forward(self.input_ids[:b], self.positions[:b], self.metas[b],
                                    self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.no_grad()
    def capture(self) -> float:
        """Captures every bucket (largest first, sharing one pool); returns seconds."""
        t = time.perf_counter()
        for b in reversed(self.buckets):
            self._forward(b)                                 # warm-up: compiles, allocates scratch
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[b] = self._forward(b)
            self.pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t

    def fits(self, batch: int) -> bool:
        return pick_bucket(batch, self.buckets) is not None

    @torch.no_grad()
    def run(self, host: dict) -> torch.Tensor:
        """Logits [B, V] for a decode batch given as host lists."""
        B = len(host["ctx"])
        b = pick_bucket(B, self.buckets)
        p = pad_decode_batch(host, b, self.max_blocks)
        nb = self.device.type == "cuda"
        for buf, data, dt in ((self.input_ids, p["input_ids"], torch.int64),
                              (self.positions, p["positions"], torch.int64),
                              (self.slots, p["slots"], torch.int64),
                              (self.ctx, p["ctx"], torch.int32),
                              (self.tables, p["tables"], torch.int32)):
            src = torch.tensor(data, dtype=dt)
            buf[:b].copy_(src.pin_memory() if nb else src, non_blocking=nb)
        if self.use_graphs and b in self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:B]
        # Eager: scratch is per-step space (e.g. the reference's decode mask
        # depends on this step's lengths); a captured graph keeps its buffers.
        self.metas[b].scratch.clear()
        return self._forward(b)[:B]


def maybe_capture(model, kv_caches, block_size, max_num_seqs, max_model_len, enforce_eager: bool):
    """A captured DecodeGraphRunner when graphs apply (CUDA, Triton ops, not
    ``enforce_eager``); else None. A failed capture falls back to eager with a
    warning instead of taking the engine down."""
    if enforce_eager or model.device.type != "cuda" or model.ops.name != "triton":
        return None
    from kernels.triton.decode_attention import pick_num_splits, sm_count
    cfg = model.cfg
    sms = sm_count(model.device)

    def splits(b):   # per bucket, for the longest context the graph may see
        return pick_num_splits(b, cfg.num_key_value_heads, max_model_len, block_size, sms)

    try:
        runner = DecodeGraphRunner(model, kv_caches, block_size, max_num_seqs, max_model_len,
                                   num_splits=splits)
        seconds = runner.capture()
    except Exception as e:   # noqa: BLE001 - any capture failure: run eagerly
        print(f"CUDA graph capture failed ({type(e).__name__}: {e}); running eagerly "
              "(LLM(enforce_eager=True) silences this)", file=sys.stderr)
        return None
    print(f"captured {len(runner.buckets)} decode CUDA graphs (batch sizes up to "
          f"{runner.buckets[-1]}) in {seconds:.1f}s", file=sys.stderr)
    return runner
