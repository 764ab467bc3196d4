"""The decode step's device inputs, kept in persistent buffers and updated in place.

A decode step of B sequences needs per sequence: the token sampled last step, its
position, its KV slot, its context length and its block table. Rebuilding those as
tensors from Python lists every step cost 41 us at batch 1 and 2.8 ms at batch 256
on the CPU VM (1.8 ms of it ``torch.tensor`` on a 256 x 128 block table), while
from one step to the next almost nothing changes: every context grows by one, and
one sequence in sixteen starts a new KV block.

So each running sequence owns a *row* of a persistent device table store for as
long as it decodes, and a step sends only what changed, in ONE host-to-device copy
of a small packed int64 buffer ("staged"; for a batch padded to b rows, regions of
w = b rounded up to even entries, so each starts 16-byte aligned for the kernels):

    [0,  w)   positions     len - 1 (padding rows: 0)
    [w,  2w)  input ids     the last token (padding: 0)
    [2w, 3w)  context lens  len (padding: 0, so attention reads nothing)
    [3w, 4w)  slots         KV slot of position len - 1 (padding: -1, no KV write)
    [4w, 5w)  rows          each sequence's row in ``store`` (padding: 0, never read)
    [5w, 5w + U), [5w + U, 5w + 2U)
              table updates: flat indices into ``store`` and their block ids. A
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

Reuse of the pinned staging buffer: the engine reads back every step's sampled
tokens (which waits for the step's copy) before it stages the next step; two
staging buffers are alternated anyway, so one step may still be in flight.
"""
from __future__ import annotations

import torch

from kernels.metadata import AttentionMetadata


class DecodeInputs:
    """Persistent decode inputs for up to ``max_rows`` sequences of up to ``max_blocks`` blocks."""

    def __init__(self, max_rows: int, max_blocks: int, block_size: int, device: torch.device):
        if max_rows < 1 or max_blocks < 1:
            raise ValueError(f"DecodeInputs needs max_rows >= 1 and max_blocks >= 1, "
                             f"got {max_rows}, {max_blocks}")
        self.max_rows, self.max_blocks, self.block_size = max_rows, max_blocks, block_size
        self.device = device
        i32 = dict(dtype=torch.int32, device=device)
        self.store = torch.zeros(max_rows, max_blocks, **i32)     # [rows, max_blocks] per sequence
        self.tables = torch.zeros(max_rows, max_blocks, **i32)    # [b, max_blocks] batch order
        self.ctx = torch.zeros(max_rows, **i32)                   # [b]
        self.qsl = torch.arange(max_rows + 1, **i32)              # [b + 1] one query each
        # Worst case: every row rewritten in one step.
        cap = 5 * (max_rows + 1) + 2 * max_rows * max_blocks
        self.staged = torch.zeros(cap, dtype=torch.int64, device=device)
        pin = device.type == "cuda"
        self._host = [torch.zeros(cap, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._host_np = [h.numpy() for h in self._host]
        self._flip = 0
        self._non_blocking = pin
        # Host bookkeeping per row: the table list written into it, entries written,
        # the last entry written.
        self._row_of: dict[int, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._row_table: list[list | None] = [None] * max_rows
        self._row_len = [0] * max_rows
        self._row_last = [-1] * max_rows
        self._last_ids: list[int] = []
        self.num_uploads = 0                # host-to-device copies made (one per stage)
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
    def stage(self, seqs: list, b: int) -> int:
        """Sends the inputs of ``seqs`` (padded to ``b`` rows) with one host-to-device
        copy and applies table updates to ``store``. Returns the longest context."""
        B = len(seqs)
        if B > b or b > self.max_rows:
            raise ValueError(f"DecodeInputs.stage: {B} sequences padded to {b} rows "
                             f"(at most {self.max_rows})")
        ids = [s.seq_id for s in seqs]
        if ids != self._last_ids:
            self._reconcile(ids)
        try:
            return self._stage(seqs, b)
        except BaseException:
            # Rows may have been marked written without their entries reaching the
            # device: make every row resend its whole table next time.
            self._row_table = [None] * self.max_rows
            raise

    def _stage(self, seqs: list, b: int) -> int:
        B = len(seqs)
        bs, W = self.block_size, self.max_blocks
        row_of, row_table, row_len, row_last = (self._row_of, self._row_table, self._row_len,
                                                self._row_last)
        pos, tok, ctx, slot, rows, upd_idx, upd_val = [], [], [], [], [], [], []
        for seq in seqs:
            toks, table = seq.token_ids, seq.block_table
            n, nt = len(toks), len(table)
            r = row_of[seq.seq_id]
            w = row_len[r]
            if row_table[r] is not table or nt < w or (w and table[w - 1] != row_last[r]):
                w = 0                                   # new or replaced table: send it all
                row_table[r] = table
            if nt > W:
                raise ValueError(f"sequence {seq.seq_id} has {nt} KV blocks; the decode inputs "
                                 f"hold {W} (max_model_len / block_size)")
            if nt > w:
                base = r * W
                upd_idx.extend(range(base + w, base + nt))
                upd_val.extend(table[w:])
                row_len[r] = nt
                row_last[r] = table[-1]
            p = n - 1
            pos.append(p)
            tok.append(toks[p])
            ctx.append(n)
            slot.append(table[p // bs] * bs + p % bs)
            rows.append(r)
        w = b + (b & 1)                              # region width: 16-byte aligned starts
        pad = w - B
        if pad:
            zeros = [0] * pad
            pos += zeros
            tok += zeros
            ctx += zeros
            slot += [-1] * pad
            rows += zeros
        U = len(upd_idx)
        buf = pos + tok + ctx + slot + rows + upd_idx + upd_val
        k = self._flip = 1 - self._flip
        self._host_np[k][:len(buf)] = buf
        self.staged[:len(buf)].copy_(self._host[k][:len(buf)], non_blocking=self._non_blocking)
        self.num_uploads += 1
        if U:
            s = self.staged
            self.store.view(-1).index_put_((s[5 * w:5 * w + U],), s[5 * w + U:5 * w + 2 * U].to(torch.int32))
            self.num_table_entries_sent += U
        return max(ctx) if ctx else 0

    def unpack(self, b: int) -> None:
        """Device side (graph-capturable): the batch's table rows and context lengths."""
        s, w = self.staged, b + (b & 1)
        torch.index_select(self.store, 0, s[4 * w:4 * w + b], out=self.tables[:b])
        self.ctx[:b].copy_(s[2 * w:2 * w + b])

    def token_views(self, b: int):
        """(input_ids [b], positions [b]): views into the staged buffer."""
        w = b + (b & 1)
        return self.staged[w:w + b], self.staged[0:b]

    def views(self, b: int, max_context_len: int, num_splits: int | None = None):
        """(input_ids [b], positions [b], meta) as views into the persistent buffers."""
        w = b + (b & 1)
        meta = AttentionMetadata(False, self.staged[3 * w:3 * w + b], self.tables[:b], self.ctx[:b],
                                 self.qsl[:b + 1], 1, max_context_len, num_splits=num_splits)
        return (*self.token_views(b), meta)
