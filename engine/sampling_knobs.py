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
output-token counts (int32 [V]) and prompt-token presence (bool [V]). The step adds
its sampled ids to the counts on the device (no host round trip); the row stays with
the sequence through preemption (recompute keeps its output tokens), is copied by
``fork``, and is released once the sequence has finished. Returned log-probs are
never affected: they are taken from the raw logits.
"""
from __future__ import annotations

import torch


class PenaltyState:
    """Pooled per-sequence token counts on one device."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.V, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self._row_of: dict[int, int] = {}         # seq_id -> row
        self._seq_of: dict[int, object] = {}      # row -> Sequence
        self._free: list[int] = []
        self.generated: dict[int, int] = {}       # seq_id -> tokens sampled so far (min_tokens)
        self._tracked: dict[int, object] = {}     # seq_id -> Sequence, for release

    def _grow(self) -> None:
        n = max(8, 2 * self.counts.shape[0])
        extra = n - self.counts.shape[0]
        self._free.extend(range(self.counts.shape[0], n))
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra, self.V)])
        self.in_prompt = torch.cat([self.in_prompt, self.in_prompt.new_zeros(extra, self.V)])

    def release_finished(self) -> None:
        for row, seq in list(self._seq_of.items()):
            if seq.is_finished:
                del self._seq_of[row], self._row_of[seq.seq_id]
                self._free.append(row)
        for sid, seq in list(self._tracked.items()):
            if seq.is_finished:
                del self._tracked[sid]
                self.generated.pop(sid, None)

    def done(self, seq) -> int:
        """Tokens generated so far, as the sampler has counted them (the host's copy of
        the output can lag a step behind with asynchronous output processing)."""
        if seq.seq_id not in self._tracked:
            self._tracked[seq.seq_id] = seq
            self.generated[seq.seq_id] = seq.num_generated_tokens
        return self.generated[seq.seq_id]

    def count_step(self, seqs) -> None:
        for seq in seqs:
            self.generated[seq.seq_id] = self.done(seq) + 1

    def rows(self, seqs) -> torch.Tensor:
        """Row indices [n] of ``seqs``, assigning (and filling) rows for new sequences."""
        out = []
        for seq in seqs:
            row = self._row_of.get(seq.seq_id)
            if row is None:
                if not self._free:
                    self.release_finished()
                if not self._free:
                    self._grow()
                row = self._free.pop()
                self._row_of[seq.seq_id], self._seq_of[row] = row, seq
                self.counts[row].zero_()
                self.in_prompt[row].zero_()
                prompt = torch.tensor(seq.prompt_token_ids, dtype=torch.int64, device=self.device)
                self.in_prompt[row].index_fill_(0, prompt, True)
                done = seq.output_token_ids
                if done:
                    self.counts[row].index_add_(0, torch.tensor(done, device=self.device),
                                                torch.ones(len(done), dtype=torch.int32, device=self.device))
            out.append(row)
        return torch.tensor(out, dtype=torch.int64, device=self.device)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """The step's sampled ids [n] of these rows, counted on the device."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def fork(self, parent, child) -> None:
        """``child`` starts with a copy of ``parent``'s counts (for forked sequences)."""
        if parent.seq_id not in self._row_of:
            return
        [row] = self.rows([child]).tolist()
        src = self._row_of[parent.seq_id]
        self.counts[row].copy_(self.counts[src])
        self.in_prompt[row].copy_(self.in_prompt[src])
        self._tracked[child.seq_id] = child
        self.generated[child.seq_id] = self.done(parent)


def needs_state(p) -> bool:
    """Whether a request's params use the penalty counts."""
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def uses_knobs(p) -> bool:
    return needs_state(p) or bool(p.logit_bias) or p.min_tokens > 0 or bool(p.bad_words_token_ids)


def apply_knobs(logits: torch.Tensor, seqs, state: PenaltyState, eos_id: int | None) -> torch.Tensor:
    """``logits`` [B, V] (a copy the caller owns) with every row's knobs applied."""
    dev = logits.device
    rows = [i for i, s in enumerate(seqs) if uses_knobs(s.params)]
    if not rows:
        return logits
    bias_r, bias_t, bias_v, mask_r, mask_t = [], [], [], [], []
    for i in rows:
        p, seq = seqs[i].params, seqs[i]
        for t, b in (p.logit_bias or {}).items():
            bias_r.append(i), bias_t.append(t), bias_v.append(b)
        if p.bad_words_token_ids:           # banned at the last token when the rest matches
            out = seq.output_token_ids
            for ids in p.bad_words_token_ids:
                k = len(ids) - 1
                if k == 0 or (len(out) >= k and out[len(out) - k:] == ids[:-1]):
                    mask_r.append(i), mask_t.append(ids[-1])
        if p.min_tokens > state.done(seq):
            stops = set(p.stop_token_ids or ())
            if eos_id is not None and not p.ignore_eos:
                stops.add(eos_id)
            for t in stops:
                mask_r.append(i), mask_t.append(t)
    if bias_r:
        logits.index_put_((torch.tensor(bias_r, device=dev), torch.tensor(bias_t, device=dev)),
                          torch.tensor(bias_v, dtype=logits.dtype, device=dev), accumulate=True)
    if mask_r:
        logits[torch.tensor(mask_r, device=dev), torch.tensor(mask_t, device=dev)] = float("-inf")
    pen = [i for i in rows if needs_state(seqs[i].params)]
    if pen:
        _penalize(logits, pen, [seqs[i] for i in pen], state)
    return logits


def _penalize(logits: torch.Tensor, pen: list[int], seqs, state: PenaltyState) -> None:
    """The three penalties on rows ``pen`` of ``logits``, in place, with as few passes
    over [n, V] as each needs (the dense ops cost ~1.5 ms per pass at 64 x 32k on the
    2-core CPU): only the penalties some row uses are computed."""
    dev, dt = logits.device, logits.dtype
    whole = len(pen) == logits.shape[0]
    idx = None if whole else torch.tensor(pen, device=dev)
    sub = logits if whole else logits[idx]
    srows = state.rows(seqs)
    counts = state.counts[srows]                                                 # [n, V] int32
    ps = [s.params for s in seqs]

    def col(name):
        return torch.tensor([getattr(p, name) for p in ps], dtype=dt, device=dev)[:, None]
    # Arithmetic rather than torch.where: where costs ~5 ms per [64, 32k] call on the CPU
    # build here, an addcmul ~1.9 ms (measured).
    # Masks as 0/1 floats made arithmetically (clamp, sign): bool -> float conversions and
    # torch.where cost several times more per [64, 32k] pass on the CPU build here.
    cf = counts.to(dt)
    used = cf.clamp(max=1.0)                                                   # count > 0
    if any(p.repetition_penalty != 1.0 for p in ps):
        rep = col("repetition_penalty")
        seen = torch.maximum(used, state.in_prompt[srows].to(dt))
        # factor: 1/rep on seen positive logits, rep on seen others, 1 elsewhere
        factor = torch.addcmul(rep - 1, sub.sign().clamp_(min=0), 1.0 / rep - rep)
        sub.mul_(factor.mul_(seen).add_(1))
    if any(p.frequency_penalty != 0.0 for p in ps):
        sub.addcmul_(cf, -col("frequency_penalty"))
    if any(p.presence_penalty != 0.0 for p in ps):
        sub.addcmul_(used, -col("presence_penalty"))
    if not whole:
        logits[idx] = sub


def min_p_filter(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below ``min_p`` [n, 1] times each row's largest."""
    return probs * (probs >= min_p * probs.amax(dim=-1, keepdim=True))
