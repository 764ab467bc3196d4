"""The per-request half of ``LLM``'s API: queueing, aborting, and the decoding-research
primitives (fork, hold / extend / release, score). ``LLM`` inherits it; it works through
the engine core that ``LLM`` builds (``self.core``: engine/engine_core.py)."""
from __future__ import annotations

import torch

from engine import request_validation
from engine.core.request_state import RequestState
from engine.core.sequence import Sequence
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


class RequestAPI:
    def get_tokenizer(self):
        return self.tokenizer

    def prepare_request(self, prompt, params: SamplingParams | None = None,
                        request_id: str | None = None) -> RequestState:
        """Validates and tokenizes one request without queueing it (``add_request``
        is ``enqueue_request(prepare_request(...))``). Touches no engine state, so a
        server can answer a bad request with an error before committing to it.
        Raises ``InvalidRequestError`` (a ValueError)."""
        self.check_alive()
        text, ids = request_validation.prompt_ids(prompt, self.tokenizer, self.config.vocab_size,
                                                  self.max_model_len)
        params = request_validation.check_params(params if params is not None else SamplingParams(),
                                                 self.config.vocab_size, self.tokenizer)
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.core.requests:
            raise InvalidRequestError(f"request_id {rid!r} is already running")
        seq = Sequence(ids, rid, params)
        if params.prompt_logprobs is not None:
            seq.logprobs_from = 1
        return RequestState(seq, text, self.tokenizer, self.eos_token_id, self.max_model_len)

    def enqueue_request(self, req: RequestState) -> str:
        """Queues a request from ``prepare_request``; returns its id."""
        self.check_alive()
        if req.request_id in self.core.requests:
            raise InvalidRequestError(f"request_id {req.request_id!r} is already running")
        self.core.requests[req.request_id] = req
        self.scheduler.add(req.seq)
        return req.request_id

    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queues one request; returns its id. Raises ``InvalidRequestError``
        (a ValueError) before queueing anything if the request is invalid."""
        return self.enqueue_request(self.prepare_request(prompt, params, request_id))

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its blocks (a held one's too). False if it is
        neither running nor held."""
        req = self.core.requests.get(str(request_id))
        if req is None:
            return self.release(request_id)
        for member in req.group.members if req.group is not None else [req]:
            if self.core.requests.pop(member.request_id, None) is not None:
                self.scheduler.finish(member.seq, "abort")
                if self.speculator is not None:
                    self.speculator.forget(member.seq)
        return True

    def extend(self, request_id: str, token_ids, params: SamplingParams | None = None,
               replace_last: bool = False) -> str:
        """Continues a held request (``SamplingParams(hold=True)``, finished) with
        ``token_ids`` (or text) appended: a new turn under the same id whose prompt is
        everything so far; only what its kept KV does not cover is prefilled.
        ``replace_last``: the token its last turn sampled (not in the KV yet) is dropped
        first, and ``token_ids`` continue from the token before it. See engine/core/held.py."""
        from engine.core.held import extend_request
        self._read_back_inflight()
        with torch.inference_mode():
            return extend_request(self.core, request_id, token_ids, params, replace_last)

    def release(self, request_id: str) -> bool:
        """Frees a held request's KV blocks. False if it is not held."""
        from engine.core.held import release_request
        self._read_back_inflight()
        with torch.inference_mode():
            return release_request(self.core, request_id)

    def fork(self, request_id: str, n: int = 1, params: SamplingParams | None = None) -> list[str]:
        """Between steps: ``n`` copies of a running request (same tokens, text, log-probs),
        each continuing on its own under a new id (returned); they share its KV blocks.
        ``params=None`` keeps its params and ``max_tokens`` budget; given ``params``, a
        child uses them from here, ``max_tokens`` counting from here. Seeded generator
        state, knob counts and processors' ``fork(parent_id, child_ids)`` hooks are
        carried over. See engine/core/forking.py."""
        from engine.core.forking import fork_request
        self._read_back_inflight()
        with torch.inference_mode():        # the step's tensors (knob state, KV) are inference tensors
            return fork_request(self.core, request_id, n, params)

    def score(self, prompt, continuations, per_token: bool = False) -> list:
        """Log-probability of each continuation (str or token ids) after ``prompt``: one
        prefill of the prompt, shared, and one of each continuation; nothing generated.
        Returns their sums, or with ``per_token`` each token's log-prob. See
        engine/sampling/continuation_logprobs.py."""
        from engine.sampling.continuation_logprobs import score
        self._read_back_inflight()
        return score(self, prompt, continuations, per_token)

    def enable_speculation(self, speculative_config: dict | None) -> None:
        """Turns speculative decoding on (``LLM(speculative_config=...)``'s dict) or off
        (None), between steps. See engine/spec_decode/speculator.py."""
        from engine.spec_decode.speculator import Speculator
        self._read_back_inflight()
        speculator = Speculator(speculative_config) if speculative_config is not None else None
        if speculator is not None:      # its verify steps' query rows (graphs captured on CUDA)
            self.core.executor.decode_runner.set_verify_query_len(1 + speculator.k)
        self.core.speculator = speculator

    def wait(self, request_ids) -> dict:
        """Steps the engine until the given requests finish; returns request id -> final
        ``RequestOutput`` (a failed one with ``.error``). Other requests advance too;
        their outputs are kept for the next ``step()``, as ``generate`` keeps them. Wait
        for a request right after adding or extending it: one that finished before the
        call is not seen (it raises once nothing is left to run)."""
        ids = [str(r) for r in request_ids]
        wanted, finals = set(ids), {}
        while len(finals) < len(wanted):
            if not self.scheduler.has_unfinished():
                raise RuntimeError(f"wait: requests {sorted(wanted - set(finals))} are not running "
                                   "(finished before this call, aborted or unknown)")
            for out in self.core.step(finished_only=True):
                if out.request_id in wanted:
                    finals[out.request_id] = out
                else:
                    self.core.undelivered[out.request_id] = out
        return finals

    def beam_search(self, prompts, params):
        """HF's beam search (``num_beams=params.beam_width``, ``early_stopping=True``) on
        shared KV; returns one ``BeamSearchOutput`` per prompt, its ``sequences`` best
        first. See engine/sampling/beam_search.py."""
        from engine.sampling.beam_search import beam_search
        self._read_back_inflight()
        return beam_search(self, prompts, params)

    def is_running(self, request_id: str) -> bool:
        """Whether ``request_id`` is queued or running (not finished, held or unknown)."""
        return str(request_id) in self.core.requests

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self.core.inflight is not None

    def _read_back_inflight(self) -> None:
        """Async scheduling: the step in flight read back and processed before an API call
        that reads or changes requests; its outputs wait for the next ``step()``."""
        if self.core.inflight is not None:
            self.core.undelivered.update((o.request_id, o) for o in self.core.finish_inflight())

    def num_generated_tokens(self, request_id: str) -> int | None:
        """Tokens sampled so far for a running request (None if it is not running).

        Counts at once, also when async output processing delays the request's
        text to the next step: a benchmark reads time-to-first-token here."""
        req = self.core.requests.get(str(request_id))
        return None if req is None else req.seq.num_generated_tokens

