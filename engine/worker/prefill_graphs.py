"""Prefill steps as CUDA-graph replays, at bucketed token counts.

An eager 7B prefill step launches ~370 kernels from Python: 17.3 ms of host time on the
H200 (`first_contact_h200.json`), while a 128-token prompt's device time is ~4-5 ms. So
time to first token was 4x the device's. Here a prefill of up to ``max_tokens`` tokens in
up to ``max_seqs`` sequences pads to the smallest token bucket (16, 32, ... up to
``max_tokens``) and replays that bucket's graph: the forward and the logits of each
sequence's last position, read from persistent buffers.

Why ``max_tokens`` = 512 by default: a 7B prefill costs ~14 GFLOP a token, so 512 tokens
are ~7 TFLOP, ~12 ms at the ~600 TFLOP/s an H100/H200 sustains on these matmuls: from
there on the device time passes the eager host cost, which then hides behind it (the
host queues launches ahead of the device), and a graph would save little while its pool
grows with the bucket. Longer prefills run eagerly (``ModelRunner.prepare``).

The padded batch: ``max_seqs`` sequence slots and T_b token rows. Real sequences come
first; padding slots have no queries (query_start_loc stays at the real token count) and
context 0, so attention runs no program for them (the dense grid's programs past a
sequence's queries exit); padding tokens belong to no sequence, write no KV (slot -1)
and their rows are never read. ``AttentionMetadata.graph_static`` makes the launchers
choose grids from shapes only (prefill attention's dense grid, never the host-built tile
map).

Staging, as the decode inputs do (engine/worker/decode_inputs.py): one host-to-device
copy of a packed int64 buffer, for bucket T_b and S = max_seqs slots:

    [0, T)           input ids        (padding 0)
    [T, 2T)          positions        (padding 0)
    [2T, 3T)         slots            (padding -1: no KV write)
    [3T, 3T + S)     context lens     (padding 0)
    [+S, +2S + 1)    query start loc  (S + 1 entries; padding slots repeat the total)
    [.., +S)         last rows        each sequence's last query row (padding 0)
    then U and U     block-table entries (flat index into the [S, max_blocks] table, block
                     id): each sequence's whole table, a prefill being rare

Not graphed (eager instead): steps that want prompt log-probs (every position's hidden
state is read), more tokens or sequences than the buckets hold, and any step when graphs
are off (CPU, ``enforce_eager``, the reference ops). ``pad_to_buckets`` runs the padded
static path eagerly: the CPU tests of what a graph replays.
"""
from __future__ import annotations

import time

import torch

from engine.utils.staged_buffer import StagedBuffer
from kernels.metadata import AttentionMetadata

DEFAULT_MAX_TOKENS = 512        # see the module docstring
DEFAULT_MAX_SEQS = 16


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, ... up to ``max_tokens`` (a power of two >= 16)."""
    if max_tokens < 16 or max_tokens & (max_tokens - 1):
        raise ValueError(f"prefill graph max_tokens must be a power of two >= 16, got {max_tokens}")
    out, t = [], 16
    while t <= max_tokens:
        out.append(t)
        t *= 2
    return out


def graph_shape(max_tokens: int, max_num_seqs: int, max_num_batched_tokens: int) -> tuple[int, int]:
    """(largest token bucket, sequence slots) of the engine's prefill graphs: no bucket past
    ``max_tokens`` or what one step may hold, at most ``DEFAULT_MAX_SEQS`` slots. (0, 0):
    none (``max_tokens`` 0)."""
    if max_tokens == 0:
        return 0, 0
    limit, top = min(max_tokens, max_num_batched_tokens), 16
    while top * 2 <= limit:
        top *= 2
    return top, min(DEFAULT_MAX_SEQS, max_num_seqs)


class PrefillRunner:
    """Prefill steps from persistent inputs: replayed graphs per token bucket, or the
    same padded path eagerly (``pad_to_buckets``)."""

    def __init__(self, model, kv_caches, block_size: int, max_model_len: int,
                 max_tokens: int = DEFAULT_MAX_TOKENS, max_seqs: int = DEFAULT_MAX_SEQS,
                 pad_to_buckets: bool = False):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_model_len = max_model_len
        self.buckets = token_buckets(max_tokens)
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.pad_to_buckets = pad_to_buckets
        dev = model.device
        self.max_blocks = W = -(-max_model_len // block_size)
        S, T = max_seqs, max_tokens
        i32 = dict(dtype=torch.int32, device=dev)
        self.tables = torch.zeros(S, W, **i32)                  # [S, max_blocks]
        self.ctx = torch.zeros(S, **i32)                        # [S]
        self.qsl = torch.zeros(S + 1, **i32)                    # [S + 1]
        cap = 3 * T + 3 * S + 1 + 2 * S * W
        self.upload = StagedBuffer(cap, dev)
        self.staged = self.upload.device_buffer
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.metas: dict[int, AttentionMetadata] = {}
        self.pool = None
        self.num_replays = 0

    # ---- which steps -------------------------------------------------------------
    def bucket_for(self, seqs: list) -> int | None:
        """The token bucket a prefill of ``seqs`` replays, None when it runs eagerly."""
        if not (self.graphs or self.pad_to_buckets) or len(seqs) > self.max_seqs:
            return None
        T = sum(len(s) - s.num_cached_tokens for s in seqs)
        for b in self.buckets:
            if b >= T:
                return b
        return None

    # ---- the step -----------------------------------------------------------------
    def stage(self, seqs: list, T_b: int) -> None:
        """One host-to-device copy of the step's inputs, padded to ``T_b`` tokens and
        ``max_seqs`` sequences; the block tables land in ``tables``."""
        bs, S, W = self.block_size, self.max_seqs, self.max_blocks
        ids, pos, slots, ctx, qsl, last, upd_idx, upd_val = [], [], [], [], [0], [], [], []
        for i, seq in enumerate(seqs):
            start, n = seq.num_cached_tokens, len(seq)
            table = seq.block_table
            if len(table) > W:
                raise ValueError(f"sequence {seq.seq_id} has {len(table)} KV blocks; the prefill inputs "
                                 f"hold {W} (max_model_len / block_size)")
            ids.extend(seq.token_ids[start:n])
            pos.extend(range(start, n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, n))
            qsl.append(qsl[-1] + n - start)
            ctx.append(n)
            last.append(qsl[-1] - 1)
            upd_idx.extend(range(i * W, i * W + len(table)))
            upd_val.extend(table)
        T, B = len(ids), len(seqs)
        pad, spad = T_b - T, S - B
        buf = (ids + [0] * pad + pos + [0] * pad + slots + [-1] * pad + ctx + [0] * spad
               + qsl + [T] * spad + last + [0] * spad + upd_idx + upd_val)
        self.upload.send(buf)
        U, at = len(upd_idx), 3 * T_b + 3 * S + 1
        if U:
            s = self.staged
            self.tables.view(-1).index_put_((s[at:at + U],), s[at + U:at + 2 * U].to(torch.int32))

    def _unpack(self, T_b: int) -> None:
        """Device side (captured): the int32 context lengths and query starts."""
        s, S = self.staged, self.max_seqs
        self.ctx.copy_(s[3 * T_b:3 * T_b + S])
        self.qsl.copy_(s[3 * T_b + S:3 * T_b + 2 * S + 1])

    def _meta(self, T_b: int) -> AttentionMetadata:
        # max_context_len is the graphs' bound (the kernels read the real lengths on the
        # device); graph_static: grids from shapes only, no host reads
        if T_b not in self.metas:
            self.metas[T_b] = AttentionMetadata(
                True, self.staged[2 * T_b:3 * T_b], self.tables, self.ctx, self.qsl, T_b,
                self.max_model_len, graph_static=True)
        return self.metas[T_b]

    def _forward(self, T_b: int, meta) -> torch.Tensor:
        """Logits [max_seqs, V] of each slot's last query row."""
        self._unpack(T_b)
        s, S = self.staged, self.max_seqs
        hidden = self.model.forward(s[:T_b], s[T_b:2 * T_b], meta, self.kv_caches)
        at = 3 * T_b + 2 * S + 1
        return self.model.compute_logits(hidden.index_select(0, s[at:at + S]))

    def launch(self, seqs: list, T_b: int) -> torch.Tensor:
        """Logits [len(seqs), V] of each sequence's last position: the step staged and
        replayed (or run eagerly on the padded buffers)."""
        self.stage(seqs, T_b)
        if T_b in self.graphs:
            self.graphs[T_b].replay()
            self.num_replays += 1
            return self.outputs[T_b][:len(seqs)]
        meta = self._meta(T_b)
        meta.scratch.clear()               # per-step space (the reference's masks)
        return self._forward(T_b, meta)[:len(seqs)]

    @torch.no_grad()
    def capture(self, pool=None) -> float:
        """Captures every bucket (largest first) into ``pool`` (the decode graphs'):
        returns seconds."""
        t = time.perf_counter()
        self.pool = pool
        for T_b in reversed(self.buckets):
            self.stage([], T_b)                           # no sequence: nothing is written
            meta = self._meta(T_b)
            self._forward(T_b, meta)                      # warm-up: compiles, allocates scratch
            torch.cuda.synchronize(self.model.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.outputs[T_b] = self._forward(T_b, meta)
            self.pool = g.pool()
            self.graphs[T_b] = g
        torch.cuda.synchronize(self.model.device)
        return time.perf_counter() - t


def build_prefill_runner(model, kv_caches, block_size: int, max_model_len: int, max_num_seqs: int,
                         max_num_batched_tokens: int, decode_runner, max_tokens: int) -> tuple:
    """(the engine's PrefillRunner or None, its status dict). Graphs are captured when the
    decode graphs were (CUDA, the Triton ops, not ``enforce_eager``) and ``max_tokens`` > 0,
    into the decode graphs' pool; a failed capture leaves prefill eager, with the error
    recorded and printed."""
    import sys
    status = dict(enabled=False, reason="", buckets=[], max_seqs=0, capture_s=None, error=None)
    if max_tokens == 0:
        status["reason"] = "prefill_graph_max_tokens=0"
        return None, status
    if not decode_runner.graph_status.get("enabled"):
        status["reason"] = f"no decode graphs ({decode_runner.graph_status.get('reason')})"
        return None, status
    top, seqs = graph_shape(max_tokens, max_num_seqs, max_num_batched_tokens)
    runner = PrefillRunner(model, kv_caches, block_size, max_model_len, max_tokens=top, max_seqs=seqs)
    try:
        seconds = runner.capture(decode_runner.pool)
    except Exception as e:   # noqa: BLE001 - any capture failure: prefill runs eagerly
        del runner
        torch.cuda.synchronize(model.device)
        status.update(reason="capture failed", error=f"{type(e).__name__}: {e}")
        print(f"CUDA graphs: prefill capture FAILED ({status['error']}); prefill runs eagerly", file=sys.stderr)
        return None, status
    status.update(enabled=True, reason="captured", buckets=list(runner.buckets), max_seqs=runner.max_seqs,
                  capture_s=round(seconds, 3))
    print(f"CUDA graphs: captured {len(runner.buckets)} prefill graphs (up to {top} tokens in up to "
          f"{runner.max_seqs} sequences) in {seconds:.1f}s", file=sys.stderr)
    return runner, status
