"""Picks next tokens from raw logits and reports raw log-probs.

Order of work for a step's logits [B, V] (fp32, raw from the model):

1. raw log-probs: ``logsumexp`` per row (always: ``cumulative_logprob`` is
   always set), plus top-N / requested ids for rows that asked for them;
2. logits processors (engine/sampling/logits_processors.py: a processor's failure, and
   NaN or all -inf rows after them, fail only the rows concerned);
3. greedy rows: exact argmax. Sampled rows: temperature, top-k, top-p, then a
   seeded draw.

Everything stays on the device; the host reads back token ids and a few
floats per row at the end.
"""
from __future__ import annotations

import array

import torch

from engine.core.sequence import Sequence
from engine.outputs import StepLogprobs
from engine.sampling.knobs import KnobState, apply_knobs, min_p_filter, restore, uses_knobs
from engine.sampling.logits_processors import (
    apply_device_grammars,
    apply_logits_processors,
    row_status,
    status_message,
)
from engine.sampling_params import SamplingParams
from engine.utils.host_to_device import HostToDevice


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._plan_seqs: list[Sequence] = []
        self._plan_val = (False, [], [], [])
        self.eos_token_id: int | None = None       # what min_tokens masks (the LLM sets it)
        self.knob_state: KnobState | None = None   # made at the first request that needs it
        # The step's small per-row tensors (temperatures, row indices, ...) go up through
        # pinned staging buffers, queued: a pageable copy would wait for the forward pass.
        self.upload = HostToDevice(device)

    def _ints(self, values) -> torch.Tensor:
        """int64 [len(values)] on the device, queued (no host wait)."""
        return self.upload.send(array.array("q", values))[0]

    def _floats(self, values) -> torch.Tensor:
        """float32 [len(values)] on the device, queued (no host wait)."""
        return self.upload.send(array.array("f", values))[0]

    def _seq_generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        if seq.sampler_state is None:
            seq.sampler_state = torch.Generator(device=self.device).manual_seed(seq.params.seed + seq.seed_offset)
        return seq.sampler_state

    def fork_state(self, parent: Sequence, child: Sequence) -> None:
        """``child`` (a fork of ``parent`` with its params) draws what ``parent`` would draw
        next: a copy of its generator's state, or the same seed when it has not drawn yet."""
        child.seed_offset = parent.seed_offset
        g = parent.sampler_state
        if isinstance(g, torch.Generator):
            child.sampler_state = torch.Generator(device=g.device)
            child.sampler_state.set_state(g.get_state())

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[int] | None = None
                     ) -> torch.Tensor:
        """Temperature / top-k / top-p sampling of rows [n, V] -> ids [n]. With ``drafts``
        (a token per row, -1: none), speculative sampling: a row's draft is kept with
        probability p(draft) under the row's distribution; else the row draws from that
        distribution with the draft removed (renormalised), so the token is distributed
        exactly as a plain draw (the draft is deterministic: q is one-hot)."""
        p: list[SamplingParams] = [s.params for s in seqs]
        temp = self._floats([x.temperature for x in p]).unsqueeze(1)
        probs = torch.softmax(logits / temp, dim=-1)
        if any(x.min_p > 0 for x in p):
            probs = min_p_filter(probs, self._floats([x.min_p for x in p])[:, None])
        if any(x.top_k > 0 or x.top_p < 1 for x in p):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            V = logits.shape[1]
            k = self._ints([x.top_k if x.top_k > 0 else V for x in p])
            top_p = self._floats([x.top_p for x in p])
            rank = torch.arange(V, device=logits.device).unsqueeze(0)
            # keep a token if it is within top-k and the mass before it is < top_p
            before = sorted_p.cumsum(-1) - sorted_p
            keep = (rank < k.unsqueeze(1)) & (before < top_p.unsqueeze(1))
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        accept = None
        if drafts is not None and any(d >= 0 for d in drafts):
            dev = logits.device
            d = self._ints(drafts)
            has = d >= 0
            col = d.clamp(min=0)[:, None]
            p_draft = probs.gather(1, col).squeeze(1) / probs.sum(-1)
            u = torch.cat([torch.rand(1, generator=self._seq_generator(seq), device=dev) for seq in seqs])
            accept = has & (u < p_draft)
            probs = probs.scatter(1, col, torch.where(has[:, None], 0.0, probs.gather(1, col)))
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=self._seq_generator(seq))
        picks = (probs / noise).argmax(dim=-1)
        return picks if accept is None else torch.where(accept, d, picks)

    def _plan(self, seqs: list[Sequence]) -> tuple[bool, list[int], list[int], list[int]]:
        """(any logits processors, greedy rows, rows wanting log-probs, rows using the
        sampling knobs) of a batch.

        A request's params change only at ``LLM.extend`` (which calls
        ``params_changed``), and a decode batch is usually the same
        sequences as last step: the plan is reused while the batch's sequences are
        (identity compare of the lists, a C loop; three Python passes over a
        256-row batch cost ~30 us of host time per step on the CPU VM)."""
        if seqs == self._plan_seqs:
            return self._plan_val
        params = [s.params for s in seqs]
        self._plan_seqs = list(seqs)
        self._plan_val = (any(p.logits_processors for p in params),
                          [i for i, p in enumerate(params) if p.greedy],
                          [i for i, p in enumerate(params) if p.wants_logprobs],
                          [i for i, p in enumerate(params) if uses_knobs(p)])
        return self._plan_val

    def params_changed(self) -> None:
        """A sequence's params were replaced (``LLM.extend``): the next plan is rebuilt."""
        self._plan_seqs = []

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], ops
                 ) -> tuple[list[int], list[StepLogprobs], dict[int, str]]:
        """logits [B, V] raw fp32 -> (token ids, log-prob info, failed rows) per sequence."""
        return self.launch(logits, seqs, ops).wait()

    # No @torch.no_grad(): the engine steps under torch.inference_mode, and the logits
    # never require grad; the decorator cost 2.8 us of a 64 us batch-1 host step
    # (cProfile, benchmarks/bench_host_step.py).
    def launch(self, logits: torch.Tensor, seqs: list[Sequence], ops, drafts: list[int] | None = None,
               processed: torch.Tensor | None = None, failed: dict[int, str] | None = None,
               grammar_inputs: torch.Tensor | None = None) -> "PendingSample":
        """Queues the step's sampling on the device; ``.wait()`` reads it back. ``drafts``
        (speculative decoding, a token per row or -1): sampled rows keep their draft
        with the speculative-sampling rule (``_sample_rows``); greedy rows ignore it (the
        verifier compares their argmax). ``processed``: the logits with every row's
        processors already applied (a verify step applies them position by position),
        ``failed`` the rows whose processor failed then. ``grammar_inputs``: the step's input
        ids [B] on the device, some unknown to the host (async scheduling): the rows'
        processors, all grammars then, run from their tables (``apply_device_grammars``)."""
        B = logits.shape[0]
        raw = logits                      # the raw logits (the knobs restore what they change)
        procs, greedy, want, knobs = self._plan(seqs)
        failed = {} if failed is None else dict(failed)
        if processed is not None:
            logits = processed
        elif procs and grammar_inputs is not None:
            logits = apply_device_grammars(raw.clone(), seqs, grammar_inputs, self._ints)
        elif procs:
            logits = apply_logits_processors(raw.clone(), seqs, failed)
        undo = None
        if knobs:
            if self.knob_state is None:
                self.knob_state = KnobState(logits.device)
            # Without processors the knobs work on the raw logits in place and put the
            # entries they changed back after sampling: no [B, V] copy (~1 ms at 64 x 32k
            # on the 2-core CPU, measured) for the raw log-probs.
            undo = apply_knobs(logits, seqs, knobs, self.knob_state, self.eos_token_id, keep_raw=not procs)
        if len(greedy) == B:
            tokens = ops.greedy_argmax(logits)
        else:
            tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
            if greedy:
                g = self._ints(greedy)
                tokens[g] = ops.greedy_argmax(logits[g])
            rest = sorted(set(range(B)) - set(greedy))
            r = self._ints(rest)
            tokens[r] = self._sample_rows(logits[r], [seqs[i] for i in rest],
                                          None if drafts is None else [drafts[i] for i in rest])
        restore(raw, undo)                          # raw again, for the log-probs
        sampled_lp = ops.gather_logprobs(raw, tokens.unsqueeze(1)).squeeze(1)      # [B]
        parts = [tokens.double(), sampled_lp.double()]
        K = 0
        if want:
            ids, lps, ranks = self._logprob_entries(raw, tokens, want, seqs, ops)
            K = ids.shape[1]
            parts += [ids.double().flatten(), lps.double().flatten(), ranks.double().flatten()]
        if procs:                                   # NaN / all-masked rows, read back with the rest
            parts.append(row_status(logits).double())
        return PendingSample(torch.cat(parts), B, want, K, failed, has_status=procs, tokens=tokens)

    def _logprob_entries(self, raw: torch.Tensor, tokens: torch.Tensor, rows: list[int],
                         seqs: list[Sequence], ops):
        """For the requesting rows, on the device: ids [n, K] (sampled, then
        top-N, then the requested ids; short rows padded by repeating their
        sampled id), their raw log-probs [n, K] and ranks [n, K].

        rank = 1 + number of tokens with a strictly larger raw logit.
        """
        dev = raw.device
        r = self._ints(rows)
        sub = raw[r]                                                   # [n, V]
        sampled = tokens[r].unsqueeze(1)                               # [n, 1]
        params = [seqs[i].params for i in rows]
        top_n = max(p.logprobs or 0 for p in params)
        n_req = max(len(p.logprob_token_ids or ()) for p in params)
        cols = [sampled]
        if top_n:
            top = sub.topk(top_n, dim=-1).indices                      # [n, top_n]
            keep = torch.arange(top_n, device=dev) < self._ints([p.logprobs or 0 for p in params]).unsqueeze(1)
            cols.append(torch.where(keep, top, sampled))
        if n_req:
            req = self._ints([t for p in params for t in (list(p.logprob_token_ids or ())
                                                          + [-1] * (n_req - len(p.logprob_token_ids or ())))]
                             ).view(len(params), n_req)
            cols.append(torch.where(req >= 0, req, sampled))
        ids = torch.cat(cols, dim=1)                                   # [n, K]
        lps = ops.gather_logprobs(sub, ids)                            # [n, K]
        return ids, lps, strict_ranks(sub, sub.gather(1, ids))


def strict_ranks(logits: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """1 + the number of entries of each row of ``logits`` [n, V] strictly larger than each
    of that row's ``vals`` [n, K]: [n, K] int64.

    On CUDA one broadcast compare [n, K, V] is one kernel. On the CPU that tensor is what
    costs: with Self-RAG's 12 requested ids (K = 13) over 80 branches and SmolLM2's 49168
    tokens it is 51M entries, 141-161 ms per step here, against 31-35 ms for one count per
    column (the ranks were 10% of a PopQA-style evaluation's time on this 2-core VM).
    """
    if logits.device.type == "cuda":
        return (logits.unsqueeze(1) > vals.unsqueeze(2)).sum(-1) + 1
    return torch.stack([torch.count_nonzero(logits > vals[:, k:k + 1], dim=-1)
                        for k in range(vals.shape[1])], dim=1) + 1


class PendingSample:
    """A step's sampling results still on the device (ids exact in float64); ``tokens``:
    the sampled ids [B] int64 on the device."""

    def __init__(self, flat: torch.Tensor, B: int, want: list[int], K: int,
                 failed: dict[int, str] | None = None, has_status: bool = False,
                 tokens: torch.Tensor | None = None):
        self.flat, self.B, self.want, self.K = flat, B, want, K
        self.failed, self.has_status = failed or {}, has_status
        self.tokens = tokens
        self._event = None
        self.extra: list[float] | None = None     # ``add_readback``'s values, after ``wait``
        self._extra_len = 0

    def add_readback(self, values: torch.Tensor) -> None:
        """Reads ``values`` (on the device, exact in float64) back with the step's results,
        in the same transfer; ``wait`` puts them in ``extra``. Call before ``start_copy``."""
        self.flat = torch.cat([self.flat, values.to(self.flat.dtype).flatten()])
        self._extra_len += values.numel()

    def start_copy(self) -> None:
        """Queues the read-back now, into pinned memory, behind this step's work only: a
        later ``wait`` then waits for this step, not for whatever was queued after it
        (async scheduling queues the next step first). A plain ``tolist`` would copy
        behind the whole stream."""
        if self.flat.device.type == "cuda":
            host = torch.empty(self.flat.shape, dtype=self.flat.dtype, pin_memory=True)
            host.copy_(self.flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self.flat = host

    def wait(self) -> tuple[list[int], list[StepLogprobs], dict[int, str]]:
        """The step's one device->host transfer: ids, log-probs, ranks, and the rows
        that failed (row -> why; their tokens mean nothing)."""
        if self._event is not None:
            self._event.synchronize()
        flat, B = self.flat.tolist(), self.B
        if self._extra_len:
            flat, self.extra = flat[:-self._extra_len], flat[-self._extra_len:]
        host_tokens = [int(t) for t in flat[:B]]
        host_lp = flat[B:2 * B]
        entries: list[dict | None] = [None] * B
        n, K = len(self.want), self.K
        off = n * K
        for j, i in enumerate(self.want):
            a = 2 * B + j * K
            entries[i] = {int(t): (v, int(r)) for t, v, r in
                          zip(flat[a:a + K], flat[a + off:a + off + K], flat[a + 2 * off:a + 2 * off + K])}
        failed = self.failed
        if self.has_status:
            for i, st in enumerate(flat[len(flat) - B:]):
                if st and i not in failed:
                    failed[i] = status_message(int(st))
        return host_tokens, [StepLogprobs(lp, e) for lp, e in zip(host_lp, entries)], failed
