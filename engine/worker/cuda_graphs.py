"""The decode step: persistent inputs, and CUDA graphs replayed per batch-size bucket.

A decode step launches ~10 kernels per layer; at batch 1 on a 7B model the
launches alone would cost more than the 4-5 ms the weights take to stream.
So on CUDA, decode runs as a replayed CUDA graph: at start-up one graph per
bucket (1, 2, 4, 8, 16, 32, ... up to ``max_num_seqs``) is captured into a
shared memory pool, each reading its inputs from the persistent buffers of
``engine.worker.decode_inputs.DecodeInputs``. A step with B sequences pads to the
smallest bucket >= B: padding rows get slot -1 (the KV write skips them),
context length 0 (attention returns zeros) and token 0, and their logits are
dropped. Prefill always runs eagerly.

Without graphs (CPU, ``enforce_eager``, the reference ops, or a failed capture)
the same persistent inputs feed an eager forward of exactly B rows. What
happened is recorded in ``DecodeRunner.graph_status`` (and printed on CUDA).
"""
from __future__ import annotations

import sys
import time

import torch

from engine.worker.decode_inputs import DecodeInputs


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


class DecodeRunner:
    """Runs decode steps from persistent inputs: replayed graphs, or eagerly.

    ``pad_to_buckets`` runs the eager path at the graphs' padded sizes too (the
    CPU tests of what a graph replays); ``num_splits`` (None, an int, or a
    function of the bucket) fixes decode attention's split count per bucket, as
    a captured graph needs.
    """

    def __init__(self, model, kv_caches, block_size: int, max_num_seqs: int, max_model_len: int,
                 num_splits=None, pad_to_buckets: bool = False):
        self.model, self.kv_caches = model, kv_caches
        self.buckets = graph_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        self.inputs = DecodeInputs(max_num_seqs, -(-max_model_len // block_size), block_size,
                                   model.device)
        self.num_splits = num_splits if callable(num_splits) else (lambda b: num_splits)
        self.pad_to_buckets = pad_to_buckets
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.metas = {}
        self.pool = None
        self.graph_status = dict(enabled=False, reason="not captured", buckets=[], capture_s=None,
                                 error=None)

    def _forward(self, b: int, meta) -> torch.Tensor:
        self.inputs.unpack(b)
        ids, pos = self.inputs.token_views(b)
        hidden = self.model.forward(ids, pos, meta, self.kv_caches)
        return self.model.compute_logits(hidden)

    def _bucket_meta(self, b: int):
        # max_context_len is the graph's bound, not a step's: the kernels read the
        # real lengths from the context-length buffer on the device.
        if b not in self.metas:
            self.metas[b] = self.inputs.views(b, self.max_model_len, self.num_splits(b))[2]
        return self.metas[b]

    @torch.no_grad()
    def capture(self) -> float:
        """Captures every bucket (largest first, sharing one pool); returns seconds."""
        t = time.perf_counter()
        for b in reversed(self.buckets):
            self.inputs.stage([], b)                        # padding rows: no KV write
            meta = self._bucket_meta(b)
            self._forward(b, meta)                          # warm-up: compiles, allocates scratch
            torch.cuda.synchronize(self.model.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[b] = self._forward(b, meta)
            self.pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize(self.model.device)
        seconds = time.perf_counter() - t
        self.graph_status = dict(enabled=True, reason="captured", buckets=list(self.buckets),
                                 capture_s=round(seconds, 3), error=None)
        return seconds

    def prepare(self, seqs: list) -> tuple[int, int, object]:
        """Stages a decode step's inputs (host work and one copy); returns
        (B, padded rows b, the step's metadata) for ``launch``."""
        B = len(seqs)
        padded = self.graphs or self.pad_to_buckets
        b = pick_bucket(B, self.buckets) if padded else B
        if b is None:
            raise ValueError(f"{B} sequences exceed the decode runner's {self.buckets[-1]} rows")
        max_ctx = self.inputs.stage(seqs, b)
        if b in self.graphs:
            return B, b, None
        if self.pad_to_buckets:
            meta = self._bucket_meta(b)
            meta.scratch.clear()     # per-step space (the reference's decode mask)
        else:                        # the kernels pick splits from this step's contexts
            meta = self.inputs.views(b, max_ctx)[2]
        return B, b, meta

    def launch(self, step: tuple[int, int, object]) -> torch.Tensor:
        """Logits [B, V] of a prepared step: a graph replay, or an eager forward (the
        engine steps under torch.inference_mode; no decorator here: ~2 us a step)."""
        B, b, meta = step
        if meta is None:
            self.graphs[b].replay()
            return self.outputs[b][:B]
        return self._forward(b, meta)[:B]

    @torch.inference_mode()
    def run(self, seqs: list) -> torch.Tensor:
        """Logits [B, V] of one decode step over ``seqs``."""
        return self.launch(self.prepare(seqs))


def build_decode_runner(model, kv_caches, block_size, max_num_seqs, max_model_len,
                        enforce_eager: bool) -> DecodeRunner:
    """The engine's DecodeRunner, with graphs captured when they apply (CUDA, the
    Triton ops, not ``enforce_eager``). A failed capture falls back to eager with a
    warning instead of taking the engine down; ``graph_status`` says which."""
    def eager(reason, error=None):
        r = DecodeRunner(model, kv_caches, block_size, max_num_seqs, max_model_len)
        r.graph_status.update(reason=reason, error=error)
        return r

    if model.device.type != "cuda":
        return eager("not CUDA")           # CPU: nothing to print
    if enforce_eager:
        runner = eager("enforce_eager=True")
    elif model.ops.name != "triton":
        runner = eager(f"kernel_backend {model.ops.name!r} (the reference ops read tensors back "
                       "to the host, which a graph cannot hold)")
    else:
        from kernels.ops import decode_num_splits
        cfg = model.cfg

        def splits(b):   # per bucket, for the longest context the graph may see
            return decode_num_splits(b, cfg.num_key_value_heads, max_model_len, block_size, model.device)

        runner = DecodeRunner(model, kv_caches, block_size, max_num_seqs, max_model_len,
                              num_splits=splits)
        try:
            runner.capture()
        except Exception as e:   # noqa: BLE001 - any capture failure: run eagerly
            del runner
            torch.cuda.synchronize(model.device)
            runner = eager("capture failed", f"{type(e).__name__}: {e}")
    st = runner.graph_status
    if st["enabled"]:
        print(f"CUDA graphs: captured {len(st['buckets'])} decode graphs (batch sizes up to "
              f"{st['buckets'][-1]}) in {st['capture_s']:.1f}s", file=sys.stderr)
    elif st["error"]:
        print(f"CUDA graphs: capture FAILED ({st['error']}); decode runs eagerly",
              file=sys.stderr)
    else:
        print(f"CUDA graphs: off ({st['reason']}); decode runs eagerly", file=sys.stderr)
    return runner
