"""Held requests: ``SamplingParams(hold=True)`` keeps a finished request's KV blocks, so
that ``LLM.extend`` can continue it with more tokens (a passage, a forced prefix) over
its cached context, and ``LLM.fork`` can copy it first (one passage per child: passage
branching with no repeated prefill). ``LLM.release`` frees it.

An extended request starts a new turn under the same id: its prompt is now everything
so far plus the new tokens (``RequestOutput.prompt_token_ids``), its output starts empty,
``max_tokens`` counts from there, and it decodes with the given params (default: its
previous ones). Only the positions its blocks do not cover are prefilled: the new
tokens, plus the last token of the previous turn (sampled, never fed back). Held blocks
count against the pool; under pressure the scheduler drops them (oldest first) before it
preempts anything running, and a later ``extend`` then recomputes them, prefix caching
serving what it still holds. Correctness never depends on the hold.

``replace_last=True`` drops the held request's last token first (the one its turn
sampled, whose KV was never computed), so a search can continue with a token of its
own choosing at no cost (``LLM.beam_search`` does).

``prompt_logprobs`` on an extended turn: the log-probs of the extension's tokens (the
list has None for the context before it, and for its first token when the kept KV
already covered the position before it: a prefill-only hold).

Per-request state: a logits processor that tracks requests sees the new turn as a
request with an empty output (``ReflectionConstraint``: call ``begin(request_id, state)``
before extending, as for a new request); seeded sampling starts afresh from the new
params' seed; the sampling knobs count the new turn's output only.
"""
from __future__ import annotations

from engine import request_validation
from engine.core.request_state import RequestState
from engine.errors import InvalidRequestError
from engine.sampling_params import is_int


def held_state(core, request_id: str, what: str):
    req = core.held.get(str(request_id))
    if req is None:
        raise InvalidRequestError(f"{what}: request {str(request_id)!r} is not held (only a finished "
                                  "request with SamplingParams(hold=True) is, until released, "
                                  "extended or aborted)")
    return req


def extend_request(core, request_id: str, token_ids, params=None, replace_last: bool = False) -> str:
    """The engine side of ``LLM.extend`` (see the module docstring). ``replace_last``:
    the held request's last token (sampled at the end of its turn, its KV never
    computed) is dropped first, so ``token_ids[0]`` takes its place: a search that
    chose another continuation than the sampled one, at no cost."""
    core.check_alive()
    rid = str(request_id)
    req = held_state(core, rid, "extend")
    seq = req.seq
    if isinstance(token_ids, str):
        if core.tokenizer is None:
            raise InvalidRequestError("extend: text needs a tokenizer; this engine has none (give token ids)")
        token_ids = core.tokenizer.encode(token_ids, add_special_tokens=False)
    if isinstance(token_ids, (bytes, dict)) or not hasattr(token_ids, "__iter__"):
        raise InvalidRequestError(f"extend: token_ids must be a list of token ids or a str, got "
                                  f"{type(token_ids).__name__}")
    token_ids = list(token_ids)
    vocab = core.config.vocab_size
    bad = [t for t in token_ids if not is_int(t) or not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"extend: token ids {bad[:5]} are not in [0, {vocab})")
    params = request_validation.check_params(params if params is not None else req.params, vocab,
                                             core.tokenizer)
    covered = core.block_manager.num_covered(seq)
    if replace_last:
        if not token_ids:
            raise InvalidRequestError("extend: replace_last needs at least one token to put in its place")
        if covered >= len(seq):
            raise InvalidRequestError(f"extend: request {rid!r}'s last token is in its KV cache already "
                                      "(a prefill-only hold); it cannot be replaced")
    if not token_ids and covered >= len(seq):
        raise InvalidRequestError(f"extend: request {rid!r} has nothing left to compute; give it tokens")
    room = core.max_model_len - len(seq) - len(token_ids) + int(replace_last)
    if room < (0 if params.max_tokens == 0 else 1):
        raise InvalidRequestError(f"extend: {len(seq)} tokens held + {len(token_ids)} new leave no room "
                                  f"to generate within max_model_len={core.max_model_len}")
    del core.held[rid]
    if replace_last:
        seq.token_ids.pop()
    old_len = len(seq)
    seq.token_ids.extend(int(t) for t in token_ids)
    # prompt_logprobs of an extended turn: the extension's tokens (the first one too if
    # the kept KV does not cover the previous last token, whose logits come with it)
    seq.logprobs_from = None if params.prompt_logprobs is None else max(old_len, covered + 1)
    seq.num_prompt_tokens = len(seq.token_ids)
    seq.params, seq.cumulative_logprob, seq.sampler_state, seq.finish_reason = params, 0.0, None, None
    core.sampler.params_changed()
    if core.sampler.knob_state is not None:
        core.sampler.knob_state.forget(seq)
    core.requests[rid] = RequestState(seq, None, core.tokenizer, core.eos_token_id, core.max_model_len)
    core.scheduler.resume(seq)
    return rid


def release_request(core, request_id: str) -> bool:
    """Frees a held request's blocks; False if it is not held."""
    req = core.held.pop(str(request_id), None)
    if req is None:
        return False
    core.scheduler.release(req.seq)
    if core.sampler.knob_state is not None:
        core.sampler.knob_state.forget(req.seq)
    return True
