"""The vLLM / OpenAI sampling knobs, applied to a step's logits on the device.

For the rows whose ``SamplingParams`` ask for them, in this order (after the batched
logits processors, before temperature and top-k/top-p/min-p):

1. ``logit_bias``: ``logits[t] += bias`` (OpenAI: -100 ... 100); ``bad_words``: a
   banned word's last token gets ``-inf`` when the output ends with the rest of it;
2. ``min_tokens``: EOS and ``stop_token_ids`` get ``-inf`` while fewer tokens than that
   have been generated (vLLM's rule; HF's ``MinNewTokensLengthLogitsProcessor`` masks EOS
   only);
3. ``repetition_penalty`` (HF's and vLLM's rule): for every token in the prompt or the
   output so far, a positive logit is divided by the penalty and a negative one
   multiplied by it;
4. ``presence_penalty`` / ``frequency_penalty`` (OpenAI): ``logits[t] -= frequency *
   count[t] + presence * (count[t] > 0)``, counting output tokens only.

Every knob touches only a few tokens of a row: those of its prompt and output, its biased
ids, its banned words' last tokens and (with ``min_tokens``) its stop ids. ``KnobState``
keeps those tokens per sequence, once each, as the *columns* of one row of a pooled device
tensor, each with three numbers that say everything the knobs do to it::

    y = logit + bias;   logit' = (y / r if y > 0 else y * r) + c

where ``r`` is the repetition penalty if the token was seen (else 1) and ``c`` is minus
the OpenAI penalties, or -inf while the token is masked. A step gathers each row's logits
at its columns, applies that ([n, columns] elementwise, a handful of ops), and scatters
the result back: no pass over the vocabulary, no per-step Python over columns, and the
gathered raw values are what ``restore`` puts back for the raw log-probs.

The host mirrors each row's columns (token -> column, output count, ...) and writes the
columns that changed (a new token, a count, a mask switching on or off) in one small copy
per step. A row's unused columns hold a *pad* token that is none of its columns, with
``bias = 0, r = 1, c = 0``: a pad rewrites its raw logit unchanged, so rows of different
widths share one [n, L] shape with no per-step width tensor. A row stays with its
sequence through preemption (recompute keeps the output tokens), is copied by ``fork``,
and is reused once the sequence has finished.
"""
from __future__ import annotations

import array
import math

import torch

from engine.utils.host_to_device import HostToDevice

TOK, BIAS, R, C = range(4)               # per column, in KnobState.cols[row, col]
MAX_TOKEN = 2 ** 24                      # token ids are stored exactly as float32 below this
STOP, BANNED, BANNED_NOW = 1, 2, 4       # _Row column flags


class _Row:
    """The host mirror of one sequence's columns: token -> [column, output count, in the
    prompt, bias, flags]."""

    def __init__(self, seq, eos_id):
        p = seq.params
        self.seq, self.n_seen = seq, 0                    # tokens of the sequence registered
        self.cols: dict[int, list] = {}
        self.pad = 0                                      # a token none of the columns hold
        self.stops = stop_ids(p, eos_id) if p.min_tokens > 0 else []
        self.stops_masked = bool(self.stops) and seq.num_generated_tokens < p.min_tokens
        self.multi = [(len(w) - 1, list(w[:-1]), w[-1]) for w in p.bad_words_token_ids or () if len(w) > 1]
        self.multi_ends = {prefix[-1] for _, prefix, _ in self.multi}
        self.row, self.pos = -1, -1                       # pooled row; place in the active batch
        self.banned_now: list[int] = []                   # multi-token bad words' last tokens, this step
        self.rep, self.freq, self.pres = p.repetition_penalty, p.frequency_penalty, p.presence_penalty

    def values(self, t: int, e: list) -> tuple:
        """(token, bias, r, c) of column entry ``e``."""
        _, count, in_prompt, bias, flags = e
        if flags & (BANNED | BANNED_NOW) or (flags & STOP and self.stops_masked):
            c = -math.inf
        else:
            c = -(self.freq * count + self.pres * (count > 0))
        return t, bias, self.rep if (count or in_prompt) else 1.0, c


class _Batch:
    """A batch's working copy of its rows: ``vals`` [n, cap, 4] (token, bias, r, c) and
    ``flat`` [n, cap] (each column's position in the flattened logits), kept current
    step by step while the batch is the same sequences (a decode batch usually is), so a
    step neither gathers the pooled rows nor recomputes the positions."""

    def __init__(self, key, pairs, rows, srows, V, cap, upload: HostToDevice):
        self.key, self.pairs, self.rows, self.cap = key, pairs, rows, cap
        self.base = [r * V for r in rows]
        base_t, self.srows_t = upload.send(array.array("q", self.base), array.array("q", srows))
        self.base_t = base_t[:, None]
        self.vals = self.flat = None


class KnobState:
    """Per sequence that uses a knob, on the device: row ``i`` of ``cols`` [rows, C, 4]
    holds the sequence's distinct tokens, then pads, each as (token, bias, r, c)."""

    def __init__(self, device: torch.device):
        self.device = device
        # Every host-to-device copy goes through pinned staging buffers, queued without
        # waiting (a pageable copy would wait for the step's forward pass to finish).
        self.upload = HostToDevice(device)
        (self._pad_row,) = self.upload.send(array.array("f", [0.0, 0.0, 1.0, 0.0]))   # a logit unchanged
        self.cols = torch.zeros(0, 256, 4, dtype=torch.float32, device=device)
        self._row_of: dict[int, int] = {}          # seq_id -> row
        self._rows: dict[int, _Row] = {}           # row -> host mirror
        self._free: list[int] = []
        self.batch: _Batch | None = None          # the decode batch's working copy

    def _grow(self, rows: int = 0, cols: int = 0) -> None:
        r, c, _ = self.cols.shape
        if rows > r:
            self._free.extend(range(r, rows))
            self.cols = torch.cat([self.cols, self._pad_row.expand(rows - r, c, 4)])
        if cols > c:
            r = self.cols.shape[0]
            (pads,) = self.upload.send(array.array("f", [self._rows[i].pad if i in self._rows else 0
                                                         for i in range(r)]))
            more = self._pad_row.repeat(r, cols - c, 1)
            more[:, :, TOK] = pads[:, None]
            self.cols = torch.cat([self.cols, more], dim=1)

    def release_finished(self) -> None:
        for row, m in list(self._rows.items()):
            if m.seq.is_finished:
                del self._rows[row], self._row_of[m.seq.seq_id]
                self._free.append(row)

    def _new_row(self, seq, m: _Row) -> int:
        if not self._free:
            self.release_finished()
        if not self._free:
            self._grow(rows=max(8, 2 * self.cols.shape[0]))
        m.row = self._free.pop()
        self._row_of[seq.seq_id], self._rows[m.row] = m.row, m
        return m.row

    def _assign(self, seq, eos_id, dirty: list) -> _Row:
        """A row for ``seq``, all pads, with the columns its params fix registered."""
        m = _Row(seq, eos_id)
        row = self._new_row(seq, m)
        self.cols[row] = self._pad_row
        self.cols[row, :, TOK] = m.pad
        p = seq.params
        for t, b in (p.logit_bias or {}).items():
            self._column(m, int(t), dirty)[3] = float(b)
        for t in m.stops:
            self._column(m, t, dirty)[4] |= STOP
        for ids in p.bad_words_token_ids or ():
            e = self._column(m, ids[-1], dirty)
            if len(ids) == 1:
                e[4] |= BANNED
        return m

    def _column(self, m: _Row, t: int, dirty: list) -> list:
        e = m.cols.get(t)
        if e is None:
            if not 0 <= t < MAX_TOKEN:
                raise ValueError(f"token id {t} is outside the sampling knobs' range [0, {MAX_TOKEN})")
            e = m.cols[t] = [len(m.cols), 0.0, 0.0, 0.0, 0]
            if t == m.pad:                     # the pad must be none of the row's tokens
                while m.pad in m.cols:
                    m.pad += 1
                b, w = self.batch, len(m.cols)
                if b is not None and m.pos >= 0:       # the working copy, and the pool below
                    b.vals[m.pos, w:, TOK] = m.pad       # for a flush that outgrows it
                    b.flat[m.pos, w:] = b.base[m.pos] + m.pad
                self.cols[m.row, w:, TOK] = m.pad
        dirty.append((m, t, e))
        return e

    def update(self, seqs, eos_id: int | None = None) -> tuple[list[int], int]:
        """Registers every token each of ``seqs`` has gained since the last call (the
        host's token lists are current when a step is launched), switches the masks that
        changed, and writes the changed columns to the pooled tensor in one copy. Returns
        (rows, the widest row's width)."""
        self.flush()
        row_of, mirrors = self._row_of, self._rows
        dirty: list = []
        pairs = []
        for seq in seqs:
            row = row_of.get(seq.seq_id)
            pairs.append((seq, self._assign(seq, eos_id, dirty) if row is None else mirrors[row]))
        self.write(self.advance(pairs, dirty), dirty)
        return [m.row for _, m in pairs], max(len(m.cols) for _, m in pairs)

    def advance(self, pairs, dirty: list) -> int:
        """The host side of a step for registered (sequence, mirror) pairs: the new tokens
        counted, bad-word and min_tokens masks switched; the changed columns are listed
        in ``dirty``. Returns the widest new width (0 if no row grew). This loop is the
        knobs' per-step host cost, so it is kept flat."""
        width = 0
        for seq, m in pairs:
            toks = seq.token_ids
            n = len(toks)
            if n > m.n_seen:
                n_prompt, cols = seq.num_prompt_tokens, m.cols
                for pos in range(m.n_seen, n):
                    t = toks[pos]
                    e = cols.get(t)
                    if e is None:
                        e = self._column(m, t, dirty)
                        width = max(width, len(cols))
                    else:
                        dirty.append((m, t, e))
                    if pos < n_prompt:
                        e[2] = 1.0
                    else:
                        e[1] += 1.0
                m.n_seen = n
                if m.banned_now or (m.multi and toks[-1] in m.multi_ends):
                    self._bad_word_suffixes(m, toks, n - n_prompt, dirty)
            if m.stops_masked and n - seq.num_prompt_tokens >= seq.params.min_tokens:
                m.stops_masked = False                    # outputs only grow (but see rewind)
                dirty.extend((m, t, m.cols[t]) for t in m.stops)
        return width

    def rewind(self, seq, n: int, counted: list[int]) -> None:
        """Undoes the counting of ``counted``, the tokens a verify step put at positions
        ``n ...`` of ``seq`` while its drafts were sampled (engine/spec_decode/speculator.py); the
        sequence's own tokens are ``seq.token_ids`` again. Masks are recomputed."""
        row = self._row_of.get(seq.seq_id)
        if row is None:
            return
        m, dirty = self._rows[row], []
        if m.n_seen != n + len(counted):
            raise ValueError(f"rewind: {seq!r} counted {m.n_seen} tokens, not {n} + {len(counted)}")
        for t in counted:
            e = m.cols[t]
            e[1] -= 1.0
            dirty.append((m, t, e))
        m.n_seen = n
        toks = seq.token_ids
        if m.multi or m.banned_now:
            self._bad_word_suffixes(m, toks, len(toks) - seq.num_prompt_tokens, dirty)
        masked = bool(m.stops) and seq.num_generated_tokens < seq.params.min_tokens
        if masked != m.stops_masked:
            m.stops_masked = masked
            dirty.extend((m, t, m.cols[t]) for t in m.stops)
        self.flush()
        self.write(0, dirty)

    def write(self, width: int, dirty: list) -> None:
        """The columns in ``dirty`` to the pooled tensor, in one copy (no batch is active)."""
        if not dirty:
            return
        if width > self.cols.shape[1]:
            self._grow(cols=max(width, 2 * self.cols.shape[1]))
        ncol, at, vals = self.cols.shape[1], array.array("q"), array.array("f")
        for m, t, e in dirty:                     # flat column; token, bias, r, c
            at.append(m.row * ncol + e[0])
            vals.extend(m.values(t, e))
        # from arrays: a list of floats is 4x slower to turn into a tensor, and each torch
        # op costs ~25 us here on the 2-core CPU VM, so there are few of them
        at_t, vals_t = self.upload.send(at, vals)
        self.cols.view(-1, 4).index_copy_(0, at_t, vals_t.view(-1, 4))

    def begin_batch(self, seqs, rows: list[int], eos_id, V: int) -> "_Batch":
        """Registers a new batch's sequences and gathers their rows into a working copy
        that the following steps update in place while the batch stays the same."""
        kseqs = [seqs[i] for i in rows]
        srows, width = self.update(kseqs, eos_id)
        b = _Batch(list(seqs), [(s, self._rows[r]) for s, r in zip(kseqs, srows)], rows, srows, V,
                   cap=-(-width // 32) * 32, upload=self.upload)
        if b.cap > self.cols.shape[1]:
            self._grow(cols=b.cap)
        b.vals = self.cols[:, :b.cap].index_select(0, b.srows_t)                  # [n, cap, 4]
        b.flat = b.base_t + b.vals[:, :, TOK].long()                              # [n, cap]
        for j, (_, m) in enumerate(b.pairs):
            m.pos = j
        self.batch = b
        return b

    def step_batch(self, eos_id, V: int) -> "_Batch":
        """The active batch, with the tokens its sequences gained since the last step
        counted and written to the working copy (or, if a row outgrew it, re-gathered)."""
        b = self.batch
        dirty: list = []
        width = self.advance(b.pairs, dirty)
        if not dirty:
            return b
        if width > b.cap:                         # rare: flush, write to the pool, re-gather
            seqs = b.key
            self.flush()
            self.write(width, dirty)
            return self.begin_batch(seqs, b.rows, eos_id, V)
        at, vals, pos = array.array("q"), array.array("f"), array.array("q")
        cap, base = b.cap, b.base
        for m, t, e in dirty:
            at.append(m.pos * cap + e[0])
            pos.append(base[m.pos] + t)
            vals.extend(m.values(t, e))
        at_t, vals_t, pos_t = self.upload.send(at, vals, pos)          # one copy, queued
        b.vals.view(-1, 4).index_copy_(0, at_t, vals_t.view(-1, 4))
        b.flat.view(-1).index_copy_(0, at_t, pos_t)
        return b

    def flush(self) -> None:
        """Puts the active batch's working copy back into the pooled tensor."""
        b, self.batch = self.batch, None
        if b is None:
            return
        self.cols[:, :b.cap].index_copy_(0, b.srows_t, b.vals)
        for _, m in b.pairs:
            m.pos = -1

    @staticmethod
    def _bad_word_suffixes(m: _Row, toks: list, n_out: int, dirty: list) -> None:
        """Bans each multi-token bad word's last token while the output ends with the rest
        of it (compared in place, no copy), and lifts last step's bans that no longer hold."""
        now = [last for k, prefix, last in m.multi
               if n_out >= k and toks[-1] == prefix[-1] and toks[len(toks) - k:] == prefix]
        if now or m.banned_now:
            for t in set(now) ^ set(m.banned_now):
                e = m.cols[t]
                e[4] ^= BANNED_NOW
                dirty.append((m, t, e))
            m.banned_now = now

    def forget(self, seq) -> None:
        """Drops ``seq``'s row (its params or turn changed: the next step builds it afresh)."""
        row = self._row_of.get(seq.seq_id)
        if row is not None:
            self.flush()
            del self._rows[row], self._row_of[seq.seq_id]
            self._free.append(row)

    def fork(self, parent, child) -> None:
        """``child`` starts with a copy of ``parent``'s row (for forked sequences)."""
        src = self._row_of.get(parent.seq_id)
        if src is None:
            return
        self.flush()                              # the parent's row may be in a working copy
        pm = self._rows[src]
        m = _Row.__new__(_Row)
        m.__dict__.update(pm.__dict__, seq=child, banned_now=list(pm.banned_now),
                          cols={t: list(e) for t, e in pm.cols.items()})
        old = self._row_of.get(child.seq_id)
        if old is not None:
            del self._rows[old], self._row_of[child.seq_id]
            self._free.append(old)
        row = self._new_row(child, m)
        self.cols[row].copy_(self.cols[src])


def stop_ids(p, eos_id: int | None) -> list[int]:
    """What ``min_tokens`` masks: ``stop_token_ids`` and EOS (unless ``ignore_eos``)."""
    stops = set(p.stop_token_ids or ())
    if eos_id is not None and not p.ignore_eos:
        stops.add(eos_id)
    return sorted(stops)


def uses_knobs(p) -> bool:
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or bool(p.logit_bias) or p.min_tokens > 0 or bool(p.bad_words_token_ids))


def apply_knobs(logits: torch.Tensor, seqs, rows: list[int], state: KnobState, eos_id: int | None,
                keep_raw: bool = False):
    """The knobs of rows ``rows`` (those whose params use any) applied to ``logits``
    [B, V] (fp32, contiguous) in place. Returns ``undo``: None, or with ``keep_raw`` the
    flat positions and raw values of every entry changed, for ``restore``."""
    if not rows:
        return None
    V = logits.shape[1]
    # a decode batch is usually the same sequences as the last step (Sequence has no
    # __eq__: the list compare is by identity), and a sequence keeps its row and mirror
    b = state.batch
    b = state.step_batch(eos_id, V) if b is not None and b.key == seqs else state.begin_batch(seqs, rows, eos_id, V)
    vals, flat = b.vals, b.flat.view(-1)                             # [n, cap, 4], [n * cap]
    # index_select / scatter_ on the flat view: 18-19 us for 19k positions on the CPU VM,
    # where logits[rows, cols] and flat[idx] indexing take 100 us
    raw = logits.view(-1).index_select(0, flat).view(len(rows), b.cap)
    y = raw + vals[:, :, BIAS]
    r = vals[:, :, R]
    x = torch.where(y > 0, y / r, y * r) + vals[:, :, C]            # division as HF divides
    logits.view(-1).scatter_(0, flat, x.view(-1))   # each (row, token) once, or a pad: raw again
    return (flat, raw.view(-1)) if keep_raw else None


def restore(logits: torch.Tensor, undo) -> None:
    """Puts back the raw entries ``apply_knobs(keep_raw=True)`` changed (pads repeat one
    position with the same raw value, so the order of the writes does not matter)."""
    if undo is not None:
        flat, raw = undo
        logits.view(-1).scatter_(0, flat, raw)


def min_p_filter(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below ``min_p`` [n, 1] times each row's largest."""
    return probs * (probs >= min_p * probs.amax(dim=-1, keepdim=True))
