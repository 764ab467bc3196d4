"""From a step's sampled tokens to ``RequestOutput``s: stop checks, deferred text,
and the failure of one request that leaves the others running.

Async output processing (CUDA): a request's new token is recorded at once, but its
text (detokenizing, stop strings) is deferred to the next step, where ``drain``
runs it while the device computes; a finish by EOS, stop id or length is reported
at once. A request whose processor failed, or whose output cannot be processed
(e.g. its tokenizer raises), ends with ``finish_reason="error"`` and an ``error``
naming it; its blocks are freed and nothing else changes.
"""
from __future__ import annotations

from engine.core.request_state import RequestState


class OutputProcessor:
    """Owns the running requests (request id -> RequestState) and their outputs."""

    def __init__(self, scheduler, async_output: bool):
        self.scheduler = scheduler
        self.async_output = async_output
        self.requests: dict[str, RequestState] = {}
        # Finished requests kept for extend / fork (SamplingParams.hold), by id.
        self.held: dict[str, RequestState] = {}
        self.deferred: list[RequestState] = []

    def process(self, seqs, tokens, lps, failed: dict[int, str], finished_only: bool,
                outputs: list, resolving: bool = False) -> None:
        """Appends each sequence's token (or fails it: ``failed`` row -> why) and adds
        the outputs due now to ``outputs``. ``finished_only``: only finished ones.
        ``resolving``: the tokens of a step queued ahead (async scheduling), each the
        oldest of its sequence's pending ones."""
        for i, (seq, tok, lp) in enumerate(zip(seqs, tokens, lps)):
            if seq.is_finished:                     # a stop string ended it meanwhile
                continue
            req = self.requests[seq.request_id]
            if i in failed:
                self.fail(req, failed[i], outputs)
                continue
            if req.params.max_tokens == 0:      # prefill and hold: nothing is generated
                self.emit(req, "length", finished_only, outputs)
                continue
            try:
                reason = req.append_token(tok, lp)
                if resolving:                       # no longer pending; its block may be full now
                    seq.num_pending -= 1
                    self.scheduler.block_manager.register_resolved(seq)
                if reason is None and self.async_output:
                    self.deferred.append(req)
                    continue
                reason = req.detokenize() or reason
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer that cannot decode it
                self.fail(req, f"processing its output raised {type(e).__name__}: {e}", outputs)
                continue
            self.emit(req, reason, finished_only, outputs)

    def process_runs(self, seqs, runs, failed: dict[int, str], finished_only: bool, outputs: list,
                     block_manager) -> None:
        """A verify step's results: per sequence a run of tokens (accepted drafts, then
        the bonus), appended one at a time, each detokenized at once, so EOS, a stop id,
        a stop string or the length limit ends the run exactly where plain decoding
        would have stopped; then the sequence's draft slots are settled (the tokens
        appended before the last are covered, the rest rolled back). A sequence in
        ``failed`` appends its run but the last token, then fails."""
        for i, (seq, (tokens, lps, drafted, accepted)) in enumerate(zip(seqs, runs)):
            if seq.is_finished:
                continue
            req = self.requests[seq.request_id]
            req.num_drafted += drafted
            req.num_accepted += accepted
            # A processor failed at the run's last position: the tokens before it are
            # plain decoding's (it emitted them in earlier steps), then the request fails.
            if i in failed:
                tokens = tokens[:-1]
            reason, n = None, 0
            try:
                for tok, lp in zip(tokens, lps):
                    n += 1
                    reason = req.append_token(tok, lp)
                    reason = req.detokenize() or reason
                    if reason is not None:
                        break
            except Exception as e:  # noqa: BLE001
                self.fail(req, f"processing its output raised {type(e).__name__}: {e}", outputs)
                continue
            if i in failed and reason is None:       # (a stop before it wins, as in plain decoding)
                self.fail(req, failed[i], outputs)
                continue
            if drafted:
                block_manager.settle_drafts(seq, n - 1)
            self.emit(req, reason, finished_only, outputs)

    def drain(self, finished_only: bool) -> list:
        """Detokenizes (and checks stop strings of) the requests whose text was
        deferred last step; returns their outputs."""
        outputs = []
        deferred, self.deferred = self.deferred, []
        for req in deferred:
            if req.seq.is_finished or req.request_id not in self.requests:
                continue
            try:
                reason = req.detokenize()
            except Exception as e:  # noqa: BLE001
                self.fail(req, f"processing its output raised {type(e).__name__}: {e}", outputs)
                continue
            self.emit(req, reason, finished_only, outputs)
        return outputs

    def flush(self, req: RequestState) -> list:
        """Processes ``req``'s text now if it was deferred from the last step (before a
        fork copies it); returns the outputs that produced (empty if nothing was owed)."""
        if req not in self.deferred:
            return []
        self.deferred.remove(req)
        done: list = []
        self.emit(req, req.detokenize(), False, done)
        return done

    def emit(self, req: RequestState, reason, finished_only: bool, outputs: list) -> None:
        if reason is not None:
            hold = req.params.hold and reason in ("stop", "length")
            self.scheduler.finish(req.seq, reason, hold=hold)
            del self.requests[req.request_id]
            if hold:
                self.held[req.request_id] = req
        if reason is not None or not finished_only:
            if req.group is None or not finished_only or req.group.finished:
                outputs.append(req.output())

    def fail(self, req: RequestState, why: str, outputs: list) -> None:
        """Ends one request with finish_reason "error" (its blocks freed); the rest go on."""
        req.error = f"request {req.request_id!r} failed: {why}"
        self.scheduler.finish(req.seq, "error")
        del self.requests[req.request_id]
        if req.group is None or req.group.finished:
            outputs.append(req.output())
