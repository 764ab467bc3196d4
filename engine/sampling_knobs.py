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

``PenaltyState`` keeps, per sequence that needs it, a row of a pooled device tensor:
its token ids (prompt, then output) and first-occurrence marks of the output tokens,
appended a few at a time (the tokens the host added since the last step) in one small
copy per step; the penalties then gather and scatter only those positions, so their
cost grows with the tokens seen, not with the vocabulary. The row stays with the
sequence through preemption (recompute keeps its output tokens), is copied by
``fork``, and is reused once the sequence has finished. Returned log-probs are never
affected: they are taken from the raw logits.
"""
from __future__ import annotations

import torch


class PenaltyState:
    """Per sequence, on the device: its token ids (prompt, then output) and, per output
    position, 1.0 where that token occurs in the output for the first time. One row of a
    pooled tensor per sequence that uses penalties; each step appends the tokens the host
    has added since (usually one: one small copy for the whole batch), so the penalties
    touch only the [n, L] positions of seen tokens, never a dense [n, V] pass."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ids = torch.zeros(0, 256, dtype=torch.int64, device=device)
        self.first = torch.zeros(0, 256, dtype=torch.float32, device=device)
        self._row_of: dict[int, int] = {}         # seq_id -> row
        self._seq_of: dict[int, object] = {}      # row -> Sequence
        self._len: dict[int, int] = {}            # row -> ids written
        self._seen: dict[int, set] = {}           # row -> output ids seen
        self._free: list[int] = []
        self.static_key, self.static_val = None, None   # apply_knobs' per-batch cache

    def _grow(self, rows: int = 0, cols: int = 0) -> None:
        r, c = self.ids.shape
        if rows > r:
            self._free.extend(range(r, rows))
            self.ids = torch.cat([self.ids, self.ids.new_zeros(rows - r, c)])
            self.first = torch.cat([self.first, self.first.new_zeros(rows - r, c)])
        if cols > c:
            r = self.ids.shape[0]
            self.ids = torch.cat([self.ids, self.ids.new_zeros(r, cols - c)], dim=1)
            self.first = torch.cat([self.first, self.first.new_zeros(r, cols - c)], dim=1)

    def release_finished(self) -> None:
        for row, seq in list(self._seq_of.items()):
            if seq.is_finished:
                del self._seq_of[row], self._row_of[seq.seq_id], self._len[row], self._seen[row]
                self._free.append(row)

    def _assign(self, seq) -> int:
        if not self._free:
            self.release_finished()
        if not self._free:
            self._grow(rows=max(8, 2 * self.ids.shape[0]))
        row = self._free.pop()
        self._row_of[seq.seq_id], self._seq_of[row] = row, seq
        self._len[row], self._seen[row] = 0, set()
        return row

    def rows(self, seqs) -> tuple[torch.Tensor, list[int]]:
        """(row indices [n], ids written per row) of ``seqs``, after appending every token
        each has gained since the last call (the host's token lists are current when a
        step is launched: the previous step's tokens were appended before it)."""
        rows, at, put_ids, put_first = [], [], [], []
        for seq in seqs:
            row = self._row_of.get(seq.seq_id)
            if row is None:
                row = self._assign(seq)
            have, toks = self._len[row], seq.token_ids
            if len(toks) > have:
                if len(toks) > self.ids.shape[1]:
                    self._grow(cols=max(len(toks), 2 * self.ids.shape[1]))
                seen, n_prompt = self._seen[row], seq.num_prompt_tokens
                for pos in range(have, len(toks)):
                    t = toks[pos]
                    at.append((row, pos))
                    put_ids.append(t)
                    new = pos >= n_prompt and t not in seen
                    if new:
                        seen.add(t)
                    put_first.append(1.0 if new else 0.0)
                self._len[row] = len(toks)
            rows.append(row)
        if at:
            r, c = torch.tensor(at, device=self.device).unbind(1)
            self.ids[r, c] = torch.tensor(put_ids, dtype=torch.int64, device=self.device)
            self.first[r, c] = torch.tensor(put_first, dtype=torch.float32, device=self.device)
        return torch.tensor(rows, dtype=torch.int64, device=self.device), [self._len[r] for r in rows]

    def fork(self, parent, child) -> None:
        """``child`` starts with a copy of ``parent``'s row (for forked sequences)."""
        src = self._row_of.get(parent.seq_id)
        if src is None:
            return
        row = self._row_of.get(child.seq_id)
        if row is None:
            row = self._assign(child)
        self.ids[row].copy_(self.ids[src])
        self.first[row].copy_(self.first[src])
        self._len[row], self._seen[row] = self._len[src], set(self._seen[src])


def needs_state(p) -> bool:
    """Whether a request's params use the penalty counts."""
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def uses_knobs(p) -> bool:
    return needs_state(p) or bool(p.logit_bias) or p.min_tokens > 0 or bool(p.bad_words_token_ids)


def _static_parts(seqs, rows, state: PenaltyState, dev, dtype):
    """The parts of a batch's knobs that do not change from step to step (the biases, the
    one-token bad words, the penalty rows), as device tensors, rebuilt only when the
    batch changes (a decode batch usually is the same sequences as the last step)."""
    # the batch itself is the key (held, so no id can be reused by a new sequence);
    # Sequence has no __eq__, so == compares identities
    if state.static_key == seqs:
        return state.static_val
    bias_r, bias_t, bias_v, ban_r, ban_t = [], [], [], [], []
    for i in rows:
        p = seqs[i].params
        for t, b in (p.logit_bias or {}).items():
            bias_r.append(i), bias_t.append(t), bias_v.append(b)
        for ids in p.bad_words_token_ids or ():
            if len(ids) == 1:
                ban_r.append(i), ban_t.append(ids[0])
    t = lambda x, **k: torch.tensor(x, device=dev, **k) if x else None        # noqa: E731
    val = dict(bias=(t(bias_r), t(bias_t), t(bias_v, dtype=dtype)) if bias_r else None,
               ban=(t(ban_r), t(ban_t)) if ban_r else None,
               multi=[i for i in rows if any(len(x) > 1 for x in seqs[i].params.bad_words_token_ids or ())],
               min_tokens=[i for i in rows if seqs[i].params.min_tokens > 0],
               pen=[i for i in rows if needs_state(seqs[i].params)])
    pen = val["pen"]
    if pen:                                 # the penalty rows' constant tensors
        ps = [seqs[i].params for i in pen]
        val["pen_rows"] = torch.tensor(pen, device=dev)
        val["n_prompt"] = torch.tensor([seqs[i].num_prompt_tokens for i in pen], device=dev)[:, None]
        val["cols"] = {name: (torch.tensor([getattr(p, name) for p in ps], dtype=dtype, device=dev)[:, None]
                              if any(getattr(p, name) != off for p in ps) else None)
                       for name, off in (("repetition_penalty", 1.0), ("frequency_penalty", 0.0),
                                         ("presence_penalty", 0.0))}
    state.static_key, state.static_val = list(seqs), val
    return val


def apply_knobs(logits: torch.Tensor, seqs, rows: list[int], state: PenaltyState, eos_id: int | None,
                keep_raw: bool = False):
    """The knobs of rows ``rows`` (those whose params use any) applied to ``logits``
    [B, V] in place. Returns ``undo``: None, or with ``keep_raw`` the (rows, cols, raw
    values) of every entry changed, so that ``restore(logits, undo)`` gives the raw
    logits back without a [B, V] copy. The host's token lists are current when a step
    is launched (the previous step's tokens were appended before it), so the lengths
    ``min_tokens`` and ``bad_words`` look at come straight from the sequences."""
    dev = logits.device
    if not rows:
        return None
    fixed = _static_parts(seqs, rows, state, dev, logits.dtype)
    mask_r, mask_t = [], []
    for i in fixed["multi"]:                # banned at the last token when the rest matches
        toks, n_out = seqs[i].token_ids, seqs[i].num_generated_tokens     # no copy of the output
        for ids in seqs[i].params.bad_words_token_ids:
            k = len(ids) - 1
            if k and n_out >= k and toks[len(toks) - k:] == ids[:-1]:
                mask_r.append(i), mask_t.append(ids[-1])
    for i in fixed["min_tokens"]:
        p, seq = seqs[i].params, seqs[i]
        if p.min_tokens > seq.num_generated_tokens:
            stops = set(p.stop_token_ids or ())
            if eos_id is not None and not p.ignore_eos:
                stops.add(eos_id)
            for t in stops:
                mask_r.append(i), mask_t.append(t)
    mask = (torch.tensor(mask_r, device=dev), torch.tensor(mask_t, device=dev)) if mask_r else None
    pen = fixed["pen"]
    where = _penalty_positions([seqs[i] for i in pen], state, fixed) if pen else None
    undo = None
    if keep_raw:
        parts = [x for x in (fixed["bias"][:2] if fixed["bias"] is not None else None, fixed["ban"], mask) if x]
        if where is not None:
            n, L = where["idx"].shape
            parts.append((fixed["pen_rows"][:, None].expand(n, L).reshape(-1), where["idx"].reshape(-1)))
        if parts:
            r = torch.cat([p[0] for p in parts])
            c = torch.cat([p[1] for p in parts])
            undo = (r, c, logits[r, c])
    if fixed["bias"] is not None:
        r, c, v = fixed["bias"]
        logits.index_put_((r, c), v, accumulate=True)
    if fixed["ban"] is not None:
        logits[fixed["ban"]] = float("-inf")
    if mask is not None:
        logits[mask] = float("-inf")
    if where is not None:
        _penalize(logits, fixed, state, where)
    return undo


def restore(logits: torch.Tensor, undo) -> None:
    """Puts back the raw entries ``apply_knobs(keep_raw=True)`` changed (duplicates hold
    the same raw value, so the order of the writes does not matter)."""
    if undo is not None:
        r, c, v = undo
        logits[r, c] = v


def _penalty_positions(seqs, state: PenaltyState, fixed: dict) -> dict:
    """The rows' seen-token positions [n, L] (pads repeat the first prompt id)."""
    dev = fixed["pen_rows"].device
    srows, lens = state.rows(seqs)
    L = max(lens)
    block = state.ids[srows, :L]
    pos = torch.arange(L, device=dev)[None, :]
    valid = pos < torch.tensor(lens, device=dev)[:, None]
    return dict(srows=srows, L=L, pos=pos, valid=valid, idx=torch.where(valid, block, block[:, :1]))


def _penalize(logits: torch.Tensor, fixed: dict, state: PenaltyState, where: dict) -> None:
    """The three penalties on the penalty rows of ``logits``, in place, through the rows'
    seen-token positions (gather / scatter): the repetition rule on every prompt and
    output position (duplicates all write the value computed from the same original
    logit), the frequency penalty added once per output position, the presence penalty
    once per output token's first occurrence."""
    whole = len(fixed["pen"]) == logits.shape[0]
    sub = logits if whole else logits[fixed["pen_rows"]]
    idx, cols = where["idx"], fixed["cols"]
    if cols["repetition_penalty"] is not None:
        rep = cols["repetition_penalty"]
        g = sub.gather(1, idx)
        sub.scatter_(1, idx, torch.where(g > 0, g / rep, g * rep))
    if cols["frequency_penalty"] is not None:
        out_pos = ((where["pos"] >= fixed["n_prompt"]) & where["valid"]).to(logits.dtype)
        sub.scatter_add_(1, idx, out_pos * -cols["frequency_penalty"])
    if cols["presence_penalty"] is not None:
        sub.scatter_add_(1, idx, state.first[where["srows"], :where["L"]] * -cols["presence_penalty"])
    if not whole:
        logits[fixed["pen_rows"]] = sub


def min_p_filter(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below ``min_p`` [n, 1] times each row's largest."""
    return probs * (probs >= min_p * probs.amax(dim=-1, keepdim=True))
