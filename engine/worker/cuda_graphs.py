"""Decode and verify steps: persistent inputs, and CUDA graphs replayed per batch-size
bucket.

A decode step launches ~10 kernels per layer; at batch 1 on a 7B model the
launches alone would cost more than the 4-5 ms the weights take to stream.
So on CUDA, decode runs as a replayed CUDA graph: at start-up one graph per
bucket (1, 2, 4, 8, 16, 32, ... up to ``max_num_seqs``) is captured into a
shared memory pool, each reading its inputs from the persistent buffers of
``engine.worker.decode_inputs.DecodeInputs``. A step with B sequences pads to the
smallest bucket >= B: padding rows get slot -1 (the KV write skips them),
context length 0 (attention returns zeros) and token 0, and their logits are
dropped. Prefill always runs eagerly.

Speculative verify steps run the same way (``verify_query_len`` Q = 1 + k): every
sequence gets Q query rows (its last token, its drafts, padding rows with slot -1),
decode attention gives each row its causal limit (``AttentionMetadata.query_lens``), and
one graph per (bucket, Q) is captured into the same pool. A verify step therefore costs
a decode step plus the matmuls' extra rows (free while the weights' read bounds them)
instead of an eager prefill's launches. The logits of the rows that are not padding are
gathered after the replay, in sequence order.

Without graphs (CPU, ``enforce_eager``, the reference ops, or a failed capture)
the same persistent inputs feed an eager forward of exactly B rows. What
happened is recorded in ``DecodeRunner.graph_status`` (and printed on CUDA).
"""
from __future__ import annotations

import sys
import time

import torch

from engine.worker.decode_inputs import DecodeInputs

# Query rows a verify step may have: 1 + num_speculative_tokens (at most 16). The staged
# buffer is sized for it up front (~0.1 MB at 256 sequences), so speculation switched on
# later (LLM.enable_speculation) only captures its graphs into the same buffers.
MAX_VERIFY_QUERY_LEN = 17


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
                 num_splits=None, pad_to_buckets: bool = False, verify_query_len: int = 1):
        self.model, self.kv_caches = model, kv_caches
        self.buckets = graph_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        self.verify_query_len = verify_query_len        # 1 + k with speculation, else 1
        if not 1 <= verify_query_len <= MAX_VERIFY_QUERY_LEN:
            raise ValueError(f"verify_query_len must be in 1..{MAX_VERIFY_QUERY_LEN}, got {verify_query_len}")
        self.inputs = DecodeInputs(max_num_seqs, -(-max_model_len // block_size), block_size,
                                   model.device, max_query_len=MAX_VERIFY_QUERY_LEN)
        self.num_splits = num_splits if callable(num_splits) else (lambda b: num_splits)
        self.pad_to_buckets = pad_to_buckets
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}     # (bucket, Q) -> graph
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.metas = {}
        self.pool = None
        self.graph_status = dict(enabled=False, reason="not captured", buckets=[], capture_s=None,
                                 error=None)

    def _forward(self, b: int, Q: int, meta, gather: bool) -> torch.Tensor:
        self.inputs.unpack(b, Q, gather)
        ids, pos = self.inputs.token_views(b, Q, gather)
        hidden = self.model.forward(ids, pos, meta, self.kv_caches)
        return self.model.compute_logits(hidden)

    def _bucket_meta(self, b: int, Q: int):
        # max_context_len is the graph's bound, not a step's: the kernels read the
        # real lengths from the context-length buffer on the device.
        if (b, Q) not in self.metas:
            self.metas[b, Q] = self.inputs.views(b, self.max_model_len, self.num_splits(b), Q)[2]
        return self.metas[b, Q]

    def graph_shapes(self) -> list[tuple[int, int]]:
        """(bucket, Q) of every graph: decode, and verify steps with speculation; most
        query rows first (the pool is sized by the first capture)."""
        qs = (1,) if self.verify_query_len == 1 else (1, self.verify_query_len)
        return sorted(((b, q) for b in self.buckets for q in qs), key=lambda s: (-s[0] * s[1], s))

    def set_verify_query_len(self, Q: int) -> None:
        """Verify steps of ``Q`` query rows from now on (speculation switched on or
        changed); a runner with graphs captures the missing ones into its pool."""
        if not 1 <= Q <= MAX_VERIFY_QUERY_LEN:
            raise ValueError(f"verify_query_len must be in 1..{MAX_VERIFY_QUERY_LEN}, got {Q}")
        self.verify_query_len = Q
        if self.graphs and any(s not in self.graphs for s in self.graph_shapes()):
            self.capture()

    @torch.no_grad()
    def capture(self) -> float:
        """Captures every (bucket, Q) not captured yet (largest first, sharing one pool);
        returns seconds."""
        t = time.perf_counter()
        for b, Q in [s for s in self.graph_shapes() if s not in self.graphs]:
            self.inputs.stage([], b, Q=Q)                   # padding rows: no KV write
            meta = self._bucket_meta(b, Q)
            # a decode graph always gathers its input ids (a pending one comes from the last
            # step's sampled ids on the device: async scheduling); 3 small kernels
            gather = Q == 1
            self._forward(b, Q, meta, gather)               # warm-up: compiles, allocates scratch
            torch.cuda.synchronize(self.model.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[b, Q] = self._forward(b, Q, meta, gather)
            self.pool = g.pool()
            self.graphs[b, Q] = g
        torch.cuda.synchronize(self.model.device)
        seconds = time.perf_counter() - t
        self.graph_status = dict(enabled=True, reason="captured", buckets=list(self.buckets),
                                 capture_s=round(seconds, 3), error=None,
                                 verify_query_len=self.verify_query_len)
        return seconds

    def prepare(self, seqs: list, drafts: dict | None = None, sources: dict | None = None) -> tuple:
        """Stages a decode step's inputs (host work and one copy), or a verify step's
        with ``drafts`` (sequence index -> draft tokens); ``sources``: seq_id -> row of
        the last step's sampled ids, for sequences whose input token is still on the
        device (``DecodeInputs``). Returns (B, padded rows b, query rows Q, the step's
        metadata, gather) for ``launch``."""
        B = len(seqs)
        padded = self.graphs or self.pad_to_buckets
        b = pick_bucket(B, self.buckets) if padded else B
        if b is None:
            raise ValueError(f"{B} sequences exceed the decode runner's {self.buckets[-1]} rows")
        Q = 1
        if drafts:
            Q = self.verify_query_len if padded else 1 + max(len(d) for d in drafts.values())
        max_ctx = self.inputs.stage(seqs, b, drafts, Q, sources)
        if (b, Q) in self.graphs:
            return B, b, Q, None, Q == 1
        if self.pad_to_buckets:
            meta = self._bucket_meta(b, Q)
            meta.scratch.clear()     # per-step space (the reference's decode mask)
        else:                        # the kernels pick splits from this step's contexts
            meta = self.inputs.views(b, max_ctx, None, Q)[2]
        return B, b, Q, meta, self.inputs.num_pending_inputs > 0

    def launch(self, step: tuple) -> torch.Tensor:
        """Logits of a prepared step: [B, V] for decode; for a verify step, the rows that
        are not padding [sum of 1 + drafts, V], in sequence order. A graph replay, or an
        eager forward (the engine steps under torch.inference_mode; no decorator here:
        ~2 us a step)."""
        B, b, Q, meta, gather = step
        if meta is None:
            self.graphs[b, Q].replay()
            logits = self.outputs[b, Q]
        else:
            logits = self._forward(b, Q, meta, gather)
        if Q == 1:
            return logits[:B]
        return logits.index_select(0, self.inputs.real_rows(b, Q))

    def input_ids(self, step: tuple) -> torch.Tensor:
        """A prepared decode step's input ids [B] on the device (pending ones included)."""
        B, b, Q, _, gather = step
        return self.inputs.token_views(b, Q, gather)[0][:B]

    def keep_sampled(self, tokens: torch.Tensor) -> None:
        """The step's sampled ids [B] (on the device), where the next decode step's pending
        inputs are gathered from (async scheduling)."""
        self.inputs.last_tokens[:tokens.shape[0]].copy_(tokens)

    @torch.inference_mode()
    def run(self, seqs: list, drafts: dict | None = None) -> torch.Tensor:
        """Logits of one decode (or verify) step over ``seqs``."""
        return self.launch(self.prepare(seqs, drafts))


def build_decode_runner(model, kv_caches, block_size, max_num_seqs, max_model_len,
                        enforce_eager: bool, verify_query_len: int = 1) -> DecodeRunner:
    """The engine's DecodeRunner, with graphs captured when they apply (CUDA, the
    Triton ops, not ``enforce_eager``). A failed capture falls back to eager with a
    warning instead of taking the engine down; ``graph_status`` says which."""
    def eager(reason, error=None):
        r = DecodeRunner(model, kv_caches, block_size, max_num_seqs, max_model_len,
                         verify_query_len=verify_query_len)
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
                              num_splits=splits, verify_query_len=verify_query_len)
        try:
            runner.capture()
        except Exception as e:   # noqa: BLE001 - any capture failure: run eagerly
            del runner
            torch.cuda.synchronize(model.device)
            runner = eager("capture failed", f"{type(e).__name__}: {e}")
    st = runner.graph_status
    if st["enabled"]:
        verify = "" if verify_query_len == 1 else f" and as many verify graphs ({verify_query_len} query rows)"
        print(f"CUDA graphs: captured {len(st['buckets'])} decode graphs{verify} (batch sizes up to "
              f"{st['buckets'][-1]}) in {st['capture_s']:.1f}s", file=sys.stderr)
    elif st["error"]:
        print(f"CUDA graphs: capture FAILED ({st['error']}); decode runs eagerly",
              file=sys.stderr)
    else:
        print(f"CUDA graphs: off ({st['reason']}); decode runs eagerly", file=sys.stderr)
    return runner
