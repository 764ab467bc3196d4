"""The decode step's device inputs, kept in persistent buffers and updated in place.

A decode step of B sequences needs per sequence: the token sampled last step, its
position, its KV slot, its context length and its block table. Rebuilding those as
tensors from Python lists every step cost 41 us at batch 1 and 2.8 ms at batch 256
on the CPU VM (1.8 ms of it ``torch.tensor`` on a 256 x 128 block table), while
from one step to the next almost nothing changes: every context grows by one, and
one sequence in sixteen starts a new KV block.

So each running sequence owns a *row* of a persistent device table store for as
long as it decodes, and a step sends only what changed, in ONE host-to-device copy
of a small packed int64 buffer ("staged"). A step has b sequence rows (the batch
padded to a graph bucket) of Q query rows each: Q = 1 for decode, 1 + k for a
speculative verify step, whose sequence i runs its last token and its d_i <= k drafts
(rows past 1 + d_i are padding). Regions, w = b and wq = b * Q rounded up to even
entries, so each starts 16-byte aligned for the kernels:

    [0, wq)          positions     len - 1 + j (padding rows: 0)
    [wq, 2wq)        input ids     the last token, then the drafts (padding: 0)
    [2wq, 3wq)       slots         KV slot of each position (padding: -1, no KV write)
    [3wq, +w)        context lens  len + d_i (padding: 0, so attention reads nothing)
    [+w, +2w)        rows          each sequence's row in ``store`` (padding: 0, never read)
    [+2w, +3w)       query lens    verify (Q > 1): 1 + d_i
                     or sources    decode (Q = 1): each sequence's row in ``last_tokens``
                                   when its input token is still pending on the device
                                   (async scheduling), else -1
    then R entries   real rows     the query rows that are not padding, i * Q + j (Q > 1
                                   only): the logits the sampler reads
    then U and U     table updates: flat indices into ``store`` and their block ids. A
                     running table only grows at its end, so a step usually sends one
                     entry per sequence that started a block; a sequence new to decoding
                     (or whose table was replaced: re-allocated after preemption) sends
                     its whole table once.

``unpack(b)`` then gathers the batch's table rows and converts the lengths on the
device (two small kernels, captured inside a CUDA graph), and ``views(b)`` hands the
model views into these buffers: a graph captured on them replays any later batch.
Table updates (when U > 0) are one ``index_put_`` before the replay.

Contract with the block manager: while a sequence runs, its ``block_table`` list
only grows at the end; any other change replaces the list object (``BlockManager.free``
does), which this class notices by identity. The last entry written is also compared,
as a cheap guard against an in-place edit.

Async scheduling: the engine may stage a decode step before it has read back the last
step's tokens. A sequence whose last token is still on the device (``seq.num_pending``)
then gets a source row: ``unpack`` gathers its input id from ``last_tokens``, where the
executor copied the previous step's sampled ids (device to device, in stream order), so
no id goes through the host between two steps.

Reuse of the pinned staging buffer: two alternate, each guarded by an event
(engine/utils/staged_buffer.py).
"""
from __future__ import annotations

import torch

from engine.utils.staged_buffer import StagedBuffer
from kernels.metadata import AttentionMetadata


class DecodeInputs:
    """Persistent decode inputs for up to ``max_rows`` sequences of up to ``max_blocks`` blocks."""

    def __init__(self, max_rows: int, max_blocks: int, block_size: int, device: torch.device,
                 max_query_len: int = 1):
        if max_rows < 1 or max_blocks < 1 or max_query_len < 1:
            raise ValueError(f"DecodeInputs needs max_rows, max_blocks and max_query_len >= 1, "
                             f"got {max_rows}, {max_blocks}, {max_query_len}")
        self.max_rows, self.max_blocks, self.block_size = max_rows, max_blocks, block_size
        self.max_query_len = max_query_len
        self.device = device
        i32 = dict(dtype=torch.int32, device=device)
        self.store = torch.zeros(max_rows, max_blocks, **i32)     # [rows, max_blocks] per sequence
        self.tables = torch.zeros(max_rows, max_blocks, **i32)    # [b, max_blocks] batch order
        self.ctx = torch.zeros(max_rows, **i32)                   # [b]
        self.qsl = torch.arange(max_rows + 1, **i32)              # [b + 1] one query each
        self.qlens = torch.ones(max_rows, **i32)                  # [b] query rows (verify)
        i64 = dict(dtype=torch.int64, device=device)
        self.last_tokens = torch.zeros(max_rows, **i64)           # the last step's sampled ids
        self.ids = torch.zeros(max_rows, **i64)                   # [b] input ids, gathered
        # Worst case: every row rewritten in one step.
        rows_q = max_rows * max_query_len
        cap = 4 * (rows_q + 1) + 4 * (max_rows + 1) + 2 * max_rows * max_blocks
        self.upload = StagedBuffer(cap, device)
        self.staged = self.upload.device_buffer
        # Host bookkeeping per row: the table list written into it, entries written,
        # the last entry written.
        self._row_of: dict[int, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._row_table: list[list | None] = [None] * max_rows
        self._row_len = [0] * max_rows
        self._row_last = [-1] * max_rows
        self._last_ids: list[int] = []
        self.num_real_rows = 0              # the last verify step's non-padding query rows
        self.num_pending_inputs = 0         # the last decode step's inputs gathered on the device
        self.num_table_entries_sent = 0     # block-table entries uploaded in all

    # ---- rows ----------------------------------------------------------------
    def _reconcile(self, ids: list[int]) -> None:
        """Frees the rows of sequences that left the decode batch, gives new ones a row."""
        live = set(ids)
        for sid in [s for s in self._row_of if s not in live]:
            r = self._row_of.pop(sid)
            self._row_table[r] = None
            self._free_rows.append(r)
        for sid in ids:
            if sid not in self._row_of:
                if not self._free_rows:
                    raise RuntimeError(f"DecodeInputs: more than {self.max_rows} sequences decode "
                                       "at once (max_num_seqs)")
                r = self._row_of[sid] = self._free_rows.pop()
                self._row_table[r] = None
        self._last_ids = ids

    # ---- the step ------------------------------------------------------------
    def stage(self, seqs: list, b: int, drafts: dict | None = None, Q: int = 1,
              sources: dict | None = None) -> int:
        """Sends the inputs of ``seqs`` (padded to ``b`` rows of ``Q`` query rows; a verify
        step's ``drafts``: sequence index -> draft tokens, at most Q - 1 each) with one
        host-to-device copy and applies table updates to ``store``. ``sources``: seq_id
        -> row of ``last_tokens`` for the sequences whose input token is pending on the
        device. Returns the longest context."""
        B = len(seqs)
        if B > b or b > self.max_rows or not 1 <= Q <= self.max_query_len:
            raise ValueError(f"DecodeInputs.stage: {B} sequences padded to {b} rows of {Q} queries "
                             f"(at most {self.max_rows} of {self.max_query_len})")
        ids = [s.seq_id for s in seqs]
        if ids != self._last_ids:
            self._reconcile(ids)
        try:
            if Q == 1:
                return self._stage(seqs, b, sources)
            if sources:
                raise ValueError("DecodeInputs.stage: a verify step needs every input token on the host")
            return self._stage_verify(seqs, b, drafts or {}, Q)
        except BaseException:
            # Rows may have been marked written without their entries reaching the
            # device: make every row resend its whole table next time.
            self._row_table = [None] * self.max_rows
            raise

    def _stage(self, seqs: list, b: int, sources: dict | None) -> int:
        """A decode step: each sequence's last token, one query row a sequence. (The hot
        path of a step's host work: one pass, locals only; a table that did not change,
        15 steps in 16, costs three compares.)"""
        B = len(seqs)
        bs = self.block_size
        row_of, row_table, row_len, row_last = (self._row_of, self._row_table, self._row_len,
                                                self._row_last)
        queue = self._queue_table
        pos, tok, ctx, slot, rows, upd_idx, upd_val = [], [], [], [], [], [], []
        src = [] if sources else None
        for seq in seqs:
            table = seq.block_table
            r = row_of[seq.seq_id]
            if row_table[r] is not table or len(table) != row_len[r] or table[-1] != row_last[r]:
                queue(seq, r, upd_idx, upd_val)
            rows.append(r)
            toks = seq.token_ids
            p = len(toks) - 1
            if src is not None:
                p += seq.num_pending
                if seq.num_pending:                 # on the device: gathered by unpack
                    tok.append(0)
                    src.append(sources[seq.seq_id])
                else:
                    tok.append(toks[p])
                    src.append(-1)
            else:
                tok.append(toks[p])
            pos.append(p)
            ctx.append(p + 1)
            slot.append(table[p // bs] * bs + p % bs)
        w = b + (b & 1)                              # region width: 16-byte aligned starts
        pad = w - B
        if pad:
            zeros = [0] * pad
            pos += zeros
            tok += zeros
            ctx += zeros
            slot += [-1] * pad
            rows += zeros
        if src is None:
            src = [-1] * w
            self.num_pending_inputs = 0
        else:
            src += [-1] * pad
            self.num_pending_inputs = w - src.count(-1)
        # the sources take the query-lens region (a verify step's only)
        self._send(pos + tok + slot + ctx + rows + src + upd_idx + upd_val, 6 * w, len(upd_idx))
        return max(ctx) if ctx else 0

    def _queue_table(self, seq, r: int, upd_idx: list, upd_val: list) -> None:
        """Queues the entries of ``seq``'s block table that row ``r`` lacks: its new ones,
        or all of it if the table is new or was replaced."""
        table, W = seq.block_table, self.max_blocks
        nt = len(table)
        w = self._row_len[r]
        if self._row_table[r] is not table or nt < w or (w and table[w - 1] != self._row_last[r]):
            w = 0                                   # new or replaced table: send it all
            self._row_table[r] = table
        if nt > W:
            raise ValueError(f"sequence {seq.seq_id} has {nt} KV blocks; the decode inputs "
                             f"hold {W} (max_model_len / block_size)")
        if nt > w:
            base = r * W
            upd_idx.extend(range(base + w, base + nt))
            upd_val.extend(table[w:])
            self._row_len[r] = nt
            self._row_last[r] = table[-1]

    def _stage_verify(self, seqs: list, b: int, drafts: dict, Q: int) -> int:
        """A verify step: each sequence's last token and its drafts, Q rows a sequence."""
        bs = self.block_size
        pos, tok, slot, ctx, rows, qlens, keep, upd_idx, upd_val = [], [], [], [], [], [], [], [], []
        for i, seq in enumerate(seqs):
            d = drafts.get(i, ())
            if len(d) >= Q:
                raise ValueError(f"DecodeInputs.stage: sequence {seq.seq_id} has {len(d)} drafts; "
                                 f"a verify step of {Q} query rows holds {Q - 1}")
            r = self._row_of[seq.seq_id]
            self._queue_table(seq, r, upd_idx, upd_val)
            rows.append(r)
            toks, table = seq.token_ids, seq.block_table
            n, q = len(toks), 1 + len(d)
            first = n - 1
            for p in range(first, first + q):
                slot.append(table[p // bs] * bs + p % bs)
            pos.extend(range(first, first + q))
            tok.append(toks[first])
            tok.extend(d)
            keep.extend(range(i * Q, i * Q + q))
            pad = Q - q
            if pad:
                pos += [0] * pad
                tok += [0] * pad
                slot += [-1] * pad
            ctx.append(n + q - 1)
            qlens.append(q)
        B = len(seqs)
        w, wq = b + (b & 1), b * Q + (b * Q & 1)
        padq, pad = wq - B * Q, w - B
        pos += [0] * padq
        tok += [0] * padq
        slot += [-1] * padq
        ctx += [0] * pad
        rows += [0] * pad
        qlens += [1] * pad
        self._send(pos + tok + slot + ctx + rows + qlens + keep + upd_idx + upd_val,
                   3 * wq + 3 * w + len(keep), len(upd_idx))
        self.num_real_rows = len(keep)
        return max(ctx) if ctx else 0

    def _send(self, buf: list, upd_at: int, U: int) -> None:
        """One host-to-device copy of ``buf``; then the ``U`` table updates at ``upd_at``."""
        self.upload.send(buf)
        if U:
            s = self.staged
            self.store.view(-1).index_put_((s[upd_at:upd_at + U],), s[upd_at + U:upd_at + 2 * U].to(torch.int32))
            self.num_table_entries_sent += U

    def unpack(self, b: int, Q: int = 1, gather: bool = False) -> None:
        """Device side (graph-capturable): the batch's table rows, context lengths and (a
        verify step) query lengths; with ``gather`` (a decode step, Q = 1) the input ids
        into ``ids``, each pending one from its source row of ``last_tokens``."""
        s, w, wq = self.staged, b + (b & 1), b * Q + (b * Q & 1)
        at = 3 * wq
        torch.index_select(self.store, 0, s[at + w:at + w + b], out=self.tables[:b])
        self.ctx[:b].copy_(s[at:at + b])
        if Q > 1:
            self.qlens[:b].copy_(s[at + 2 * w:at + 2 * w + b])
        elif gather:
            src = s[at + 2 * w:at + 2 * w + b]
            picked = self.last_tokens.index_select(0, src.clamp(min=0))
            torch.where(src >= 0, picked, s[wq:wq + b], out=self.ids[:b])

    def token_views(self, b: int, Q: int = 1, gather: bool = False):
        """(input_ids [b * Q], positions [b * Q]): views into the persistent buffers (the
        gathered ids with ``gather``)."""
        n = b * Q
        wq = n + (n & 1)
        return self.ids[:b] if gather else self.staged[wq:wq + n], self.staged[0:n]

    def real_rows(self, b: int, Q: int) -> torch.Tensor:
        """The last verify step's query rows that are not padding (indices into its
        b * Q logits), staged with it."""
        w, wq = b + (b & 1), b * Q + (b * Q & 1)
        at = 3 * wq + 3 * w
        return self.staged[at:at + self.num_real_rows]

    def views(self, b: int, max_context_len: int, num_splits: int | None = None, Q: int = 1,
              gather: bool = False):
        """(input_ids [b * Q], positions [b * Q], meta) as views into the persistent buffers."""
        wq = b * Q + (b * Q & 1)
        meta = AttentionMetadata(False, self.staged[2 * wq:2 * wq + b * Q], self.tables[:b], self.ctx[:b],
                                 self.qsl[:b + 1], Q, max_context_len, num_splits=num_splits,
                                 query_lens=self.qlens[:b] if Q > 1 else None)
        return (*self.token_views(b, Q, gather), meta)
