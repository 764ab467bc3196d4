"""Speculative decoding: drafts verified in one forward pass, output identical to plain
decoding.

``LLM(..., speculative_config={"method": "ngram", "num_speculative_tokens": 4,
"prompt_lookup_max": 4, "prompt_lookup_min": 1})`` (vLLM's keys; ``"method": "custom"``
with ``"proposer": obj`` takes any engine/spec_decode/proposers.py-style proposer; our own key
``"shared_lookup": True`` lets finished sequences' text draft for later ones;
vLLM's ``"disable_by_batch_size": n`` makes decode steps of more than n sequences plain
ones, where verifying costs more than it saves (on the CPU VM a Self-RAG batch of 8 ran
at 0.80x with speculation);
``"grammar"`` drafts only the tokens the logits processors make certain). With any
method, a token that a request's logits processor makes certain (``forced_token``, e.g.
``<paragraph>`` after Self-RAG's ``[Retrieval]``) is drafted first; the proposer drafts
when no token is forced.

In a decode step, each eligible sequence gets up to k drafts from the proposer, KV slots
for them (``BlockManager.reserve_drafts``), and the step becomes a *verify* step: every sequence
runs its last token, plus its drafts if it has any, over its cached context, through
the decode path with 1 + k query rows per sequence (engine/worker/cuda_graphs.py: a graph
replay on CUDA, as a decode step is). The sampler picks a token
at every position as a plain step would; a sequence keeps the longest prefix of drafts
equal to those picks, plus the pick after it (the bonus token), so the tokens are
exactly plain decoding's, and so are their raw log-probs. The output processor appends
them one by one (EOS, stop ids, stop strings and ``max_tokens`` cut the run where plain
decoding would stop), then the block manager keeps the accepted slots and rolls back
the rest.

Sampled requests (temperature > 0) keep a draft with probability p(draft) under the
distribution a plain step would sample from (after temperature, top-k/p, min-p, knobs and
processors) and otherwise draw from it with the draft removed, which keeps the output
distribution exact; a seeded request then draws from its generator in another order than
plain decoding, so its tokens differ from a plain run's, token for token. Logits
processors and the sampling knobs apply at every verified position as at a plain step:
the processors (and, when a speculating request uses the knobs, the whole sampler) run
position by position, a sequence's tokens being its own plus the drafts before that
position; the knobs' counts of the drafts are undone after. A processor may therefore
see a request's output grow by several tokens within one step and then shrink back (a
rewind): its result must depend only on the request id and the output it is given
(``ReflectionConstraint`` re-derives its state from the output when it shrinks).

Sequences whose drafts are rarely accepted back off: after a step that accepts nothing, a
sequence waits ``2**misses`` steps (at most 16) before it is offered drafts again, so text
with nothing to copy is not slowed down.
"""
from __future__ import annotations

import array

import torch

from engine.core.sequence import Sequence
from engine.sampling.knobs import uses_knobs
from engine.sampling.logits_processors import apply_logits_processors
from engine.sampling_params import is_int
from engine.spec_decode.proposers import NgramProposer

METHODS = ("ngram", "grammar", "custom")


class Speculator:
    def __init__(self, config: dict):
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(config).__name__}")
        unknown = set(config) - {"method", "num_speculative_tokens", "prompt_lookup_max",
                                 "prompt_lookup_min", "proposer", "shared_lookup", "disable_by_batch_size"}
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {sorted(unknown)}")
        method = config.get("method", "ngram")
        if method not in METHODS:
            raise ValueError(f"speculative_config: method={method!r}; use one of {METHODS}")
        k = config.get("num_speculative_tokens")
        if not is_int(k) or not 1 <= k <= 16:
            raise ValueError(f"speculative_config: num_speculative_tokens={k!r} must be an int in [1, 16]")
        self.k = int(k)
        cap = config.get("disable_by_batch_size")
        if cap is not None and (not is_int(cap) or cap < 1):
            raise ValueError(f"speculative_config: disable_by_batch_size={cap!r} must be an int >= 1 or None")
        self.disable_by_batch_size = None if cap is None else int(cap)
        if method == "ngram":
            self.proposer = NgramProposer(config.get("prompt_lookup_min", 1), config.get("prompt_lookup_max", 4),
                                          shared=bool(config.get("shared_lookup", False)))
        elif method == "grammar":
            self.proposer = None
        else:
            self.proposer = config.get("proposer")
            if not callable(getattr(self.proposer, "propose", None)):
                raise ValueError("speculative_config: method 'custom' needs a 'proposer' with propose(seq_id, "
                                 "token_ids, k)")
        self._wait: dict[int, tuple[int, int]] = {}      # seq_id -> (steps to skip, misses)
        # verify steps; sequences that had drafts in one (summed over steps); drafts; accepted
        self.num_verify_steps = self.num_speculating_rows = self.num_drafted = self.num_accepted = 0

    def plan(self, seqs: list[Sequence], requests: dict, bm) -> dict[int, list[int]]:
        """Drafts per sequence index of a decode step, with their KV slots reserved in
        ``bm`` (the block manager); ``requests``: request id -> RequestState."""
        drafts = {}
        if self.disable_by_batch_size is not None and len(seqs) > self.disable_by_batch_size:
            return drafts               # a batch this large is cheaper to decode plainly
        for i, seq in enumerate(seqs):
            skip, misses = self._wait.get(seq.seq_id, (0, 0))
            if skip:
                self._wait[seq.seq_id] = (skip - 1, misses)
                continue
            req = requests.get(seq.request_id)
            if req is None:
                continue
            k = min(self.k, req.max_len - len(seq) - 1)      # drafts + the bonus fit the length limit
            if k < 1:
                continue
            d = self._forced(seq, k)
            if not d and self.proposer is not None:
                d = list(self.proposer.propose(seq.seq_id, seq.token_ids, k))[:k]
            if d and bm.can_reserve_drafts(seq, len(d)):
                bm.reserve_drafts(seq, len(d))
                drafts[i] = d
        return drafts

    def verify(self, executor, seqs: list[Sequence], drafts: dict[int, list[int]], logits: torch.Tensor):
        """The picks on ``executor``'s sampler over the verify forward's ``logits`` [rows,
        V] (sequence i: its last token's row, then one per draft), and the longest
        accepted run of each sequence: (per sequence, its run of tokens and their step
        log-probs; failed sequence index -> why)."""
        tokens, lps, failed_rows, accepted = self._pick(executor, seqs, drafts, logits)
        runs, failed, r = [], {}, 0
        for i, seq in enumerate(seqs):
            d = drafts.get(i, [])
            picks = tokens[r:r + len(d) + 1]
            # the accepted drafts, cut where a processor failed (never read past there)
            a = next((j for j in range(accepted[i]) if r + j in failed_rows), accepted[i])
            runs.append((picks[:a + 1], lps[r:r + a + 1], len(d), a))
            # A processor that failed at a rejected position was never reached by plain
            # decoding; one at the accepted run's end (the bonus position) fails the
            # request after the tokens before it (OutputProcessor.process_runs).
            if r + a in failed_rows:
                failed[i] = failed_rows[r + a]
            r += len(d) + 1
        self.num_verify_steps += 1
        for i, (_, _, k, a) in enumerate(runs):
            if k:
                self._after(seqs[i], k, a)
        return runs, failed

    @staticmethod
    def _forced(seq: Sequence, k: int) -> list[int]:
        """Grammar drafts: the tokens the request's logits processors make certain, as
        long as one of them names one (a processor with ``forced_token(request_id,
        output_token_ids) -> int | None``, e.g. ReflectionConstraint)."""
        procs = [p for p in seq.params.logits_processors or () if callable(getattr(p, "forced_token", None))]
        forced: list[int] = []
        if not procs:
            return forced
        out = seq.output_token_ids
        while len(forced) < k:
            t = next((f for p in procs if (f := p.forced_token(seq.request_id, out + forced)) is not None), None)
            if t is None:
                break
            forced.append(t)
        return forced

    @staticmethod
    def _pick(executor, seqs, drafts, logits):
        """The sampler at every verified position: (tokens, log-probs, failed) per row, and
        each sequence's accepted drafts (its drafts equal to the picks before them). When no speculating
        sequence uses the sampling knobs, the processors run position by position
        (``_processed``), the sampler once over all rows, and the acceptance is counted
        on the device and read back with the picks (``_accepted_on_device``): one
        read-back a step. Else the sampler runs position by position
        (``_pick_by_position``)."""
        if any(uses_knobs(seqs[i].params) for i in drafts):
            tokens, lps, failed = Speculator._pick_by_position(executor, seqs, drafts, logits)
            accepted, r = [], 0
            for i in range(len(seqs)):          # already on the host: compared here
                d = drafts.get(i, [])
                accepted.append(next((j for j, t in enumerate(d) if t != tokens[r + j]), len(d)))
                r += len(d) + 1
            return tokens, lps, failed, accepted
        rows = [seq for i, seq in enumerate(seqs) for _ in range(1 + len(drafts.get(i, ())))]
        here = [t for i in range(len(seqs)) for t in list(drafts.get(i, ())) + [-1]]
        failed: dict[int, str] = {}
        processed = Speculator._processed(seqs, drafts, logits, failed)
        pending = executor.sampler.launch(logits, rows, executor.model.ops, here, processed, failed)
        pending.add_readback(Speculator._accepted_on_device(executor.sampler.upload, seqs, drafts, here,
                                                            pending.tokens))
        tokens, lps, failed_rows = pending.wait()
        return tokens, lps, failed_rows, [int(a) for a in pending.extra]

    @staticmethod
    def _accepted_on_device(upload, seqs, drafts, here: list[int], picks: torch.Tensor) -> torch.Tensor:
        """Per sequence, how many of its drafts equal the picks before them, counted on the
        device: [B] int64. ``here`` [R]: each row's draft (-1 at the bonus rows), ``picks``
        [R] the sampler's tokens (a sampled row's pick is its draft when the speculative
        rule kept it). A row is accepted when no row from its sequence's first up to it
        mismatched: mismatches are counted by a cumulative sum, and each sequence's
        count before its first row is subtracted."""
        seg, starts = [], []
        for i in range(len(seqs)):
            starts.append(len(seg))
            seg.extend([i] * (1 + len(drafts.get(i, ()))))
        d, seg_t, starts_t = upload.send(array.array("q", here), array.array("q", seg), array.array("q", starts))
        miss = ((picks != d) | (d < 0)).long()                     # [R]: the bonus rows never accept
        ahead = miss.cumsum(0)
        before = ahead.index_select(0, starts_t) - miss.index_select(0, starts_t)          # [B]
        ok = (ahead == before.index_select(0, seg_t)).long()
        return torch.zeros(len(seqs), dtype=torch.int64, device=picks.device).scatter_add_(0, seg_t, ok)

    @staticmethod
    def _positions(seqs, drafts):
        """Yields, for each verified position j, (the sequences that reach it, their rows
        in the step's logits), each of those sequences' tokens being its own plus its
        first j drafts meanwhile (restored when the iteration ends)."""
        starts, r = [], 0
        for i in range(len(seqs)):
            starts.append(r)
            r += 1 + len(drafts.get(i, ()))
        lens = [len(s) for s in seqs]
        try:
            for j in range(1 + max(len(d) for d in drafts.values())):
                group = [i for i in range(len(seqs)) if len(drafts.get(i, ())) >= j]
                for i in group:
                    if j:
                        seqs[i].token_ids.append(drafts[i][j - 1])
                yield j, group, [starts[i] + j for i in group]
        finally:
            for seq, n in zip(seqs, lens):
                del seq.token_ids[n:]

    @staticmethod
    def _processed(seqs, drafts, logits, failed: dict) -> torch.Tensor | None:
        """The logits with each row's processors applied, position by position (a
        request id at most once per call)."""
        if not any(s.params.logits_processors for s in seqs):
            return None
        processed = logits.clone()
        positions = Speculator._positions(seqs, drafts)
        try:
            for _, group, rows in positions:
                index = torch.tensor(rows, device=logits.device)
                bad: dict[int, str] = {}
                processed[index] = apply_logits_processors(processed.index_select(0, index),
                                                           [seqs[i] for i in group], bad)
                failed.update((rows[g], why) for g, why in bad.items())
        finally:
            positions.close()
        return processed

    @staticmethod
    def _pick_by_position(executor, seqs, drafts, logits):
        """The sampler position by position, so that the sampling knobs (and the
        processors) see what a plain step would; then the knobs' counts of the drafts
        are undone. (tokens, log-probs, failed) per row."""
        n_rows = sum(1 + len(drafts.get(i, ())) for i in range(len(seqs)))
        tokens, lps, failed = [None] * n_rows, [None] * n_rows, {}
        lens = [len(s) for s in seqs]
        positions = Speculator._positions(seqs, drafts)
        try:
            for j, group, rows in positions:
                index = torch.tensor(rows, device=logits.device)
                here = [drafts[i][j] if j < len(drafts.get(i, ())) else -1 for i in group]
                t, lp, bad = executor.sampler.launch(logits.index_select(0, index), [seqs[i] for i in group],
                                                executor.model.ops, here).wait()
                for g, row in enumerate(rows):
                    tokens[row], lps[row] = t[g], lp[g]
                    if g in bad:
                        failed[row] = bad[g]
        finally:
            positions.close()                   # the sequences' own tokens again, then the rewind
            knobs = executor.sampler.knob_state
            if knobs is not None:
                for i, d in drafts.items():
                    knobs.rewind(seqs[i], lens[i], list(d))
        return tokens, lps, failed

    def _after(self, seq: Sequence, k: int, a: int) -> None:
        self.num_speculating_rows += 1
        self.num_drafted += k
        self.num_accepted += a
        skip, misses = self._wait.get(seq.seq_id, (0, 0))
        misses = misses + 1 if a == 0 else 0
        self._wait[seq.seq_id] = (min(2 ** misses, 16) if misses else 0, misses)

    def forget_finished(self, seqs) -> None:
        for seq in seqs:
            if seq.is_finished:
                self.forget(seq)

    def forget(self, seq: Sequence) -> None:
        self._wait.pop(seq.seq_id, None)
        forget = getattr(self.proposer, "forget", None)
        if callable(forget):
            forget(seq.seq_id)
