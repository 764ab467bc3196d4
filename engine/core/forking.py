"""``LLM.fork``: copies of a running (or held) request that continue on their own,
sharing its KV. A held request's children are held too, each ready for its own
``extend`` (engine/core/held.py).

Called between steps. At that moment the parent's token list ends with the token it
sampled last step, whose KV the next decode step computes; its KV covers every token
before it. A child gets:

* the same token ids (prompt and output so far), text, log-probs and
  ``cumulative_logprob``, under a new request id;
* the parent's KV blocks: every full block is shared by reference count, the last,
  partial one is copied (``BlockManager.fork``; one new block at most per child);
  the child then decodes like the parent. When the batch is full or the pool has no
  block for the copy, the child waits instead and is prefilled like a preempted
  request (prefix caching serves the shared full blocks again);
* the per-request state: a seeded request's generator state (so a seeded child
  draws what the parent would have drawn next), the sampling knobs' counts, and
  for every logits processor with a ``fork(parent_id, child_ids)`` method, a call
  so that it can copy its own per-request state.

``params=None`` keeps the parent's params, and ``max_tokens`` keeps counting from the
original start; given ``params``, the child uses them from the fork point, and its
``max_tokens`` counts from there.
"""
from __future__ import annotations

import copy

from engine import request_validation
from engine.core.sequence import Sequence, SequenceStatus
from engine.errors import InvalidRequestError
from engine.sampling_params import is_int


def fork_request(core, request_id: str, n: int = 1, params=None) -> list[str]:
    """The engine side of ``LLM.fork`` on the engine core (engine/engine_core.py; see the
    module docstring); returns the children's request ids (``"<parent id>.<k>"``, k
    counting the parent's children)."""
    core.check_alive()
    rid = str(request_id)
    req = core.requests.get(rid)
    held = req is None and rid in core.held
    if held:
        req = core.held[rid]
    if req is None:
        raise InvalidRequestError(f"fork: request {rid!r} is neither running nor held (unknown, "
                                  "finished without hold=True, released or aborted)")
    if not is_int(n) or n < 1:
        raise InvalidRequestError(f"fork: n={n!r} must be an int >= 1")
    if params is not None:
        params = request_validation.check_params(params, core.config.vocab_size, core.tokenizer)
    done = core.outputs.flush(req)          # text still owed from last step: finish it first
    if done:
        core.undelivered.update((o.request_id, o) for o in done)
        if req.seq.is_finished:
            raise InvalidRequestError(f"fork: request {rid!r} has just finished (a stop string "
                                      "matched); its output comes with the next step()")
    parent = req.seq
    children = []
    for _ in range(n):
        req.num_forks += 1
        while (cid := f"{rid}.{req.num_forks}") in core.requests or cid in core.held:
            req.num_forks += 1
        child = _child_sequence(parent, cid, params)
        if params is None:
            core.sampler.fork_state(parent, child)
        if held:
            _hold_copy(core, parent, child)
        else:
            _place(core, parent, child)
        if core.sampler.knob_state is not None and params is None:   # new params: built afresh
            core.sampler.knob_state.fork(parent, child)
        (core.held if held else core.requests)[cid] = req.fork(child, params is not None)
        children.append(child)
    ids = [c.request_id for c in children]
    _tell_processors(parent.params, rid, ids)
    if params is not None and params.logits_processors is not parent.params.logits_processors:
        _tell_processors(params, rid, ids)
    return ids


def _child_sequence(parent: Sequence, cid: str, params) -> Sequence:
    child = Sequence(list(parent.token_ids), cid, params if params is not None else parent.params)
    child.num_prompt_tokens = parent.num_prompt_tokens
    child.cumulative_logprob = parent.cumulative_logprob
    return child


def _place(core, parent: Sequence, child: Sequence) -> None:
    """Shares the parent's KV and puts the child beside it in the running batch, or
    queues it to be prefilled (no room in the batch or no block for the copy)."""
    sched, bm = core.scheduler, core.block_manager
    if (parent.status is SequenceStatus.RUNNING and parent in sched.running
            and len(sched.running) < sched.max_num_seqs and bm.can_fork(parent)):
        core.runner.copy_blocks(bm.fork(parent, child))
        child.status = SequenceStatus.RUNNING
        sched.running.append(child)
    else:
        sched.add(child)


def _hold_copy(core, parent: Sequence, child: Sequence) -> None:
    """A held copy of a held parent: it shares the parent's kept blocks (if they were not
    dropped and a block is free for the partial copy; else an ``extend`` recomputes)."""
    child.status, child.finish_reason = SequenceStatus.FINISHED, parent.finish_reason
    bm = core.block_manager
    if parent.block_table and bm.can_fork(parent):
        core.runner.copy_blocks(bm.fork(parent, child))
        core.scheduler.hold(child)


def _tell_processors(params, parent_id: str, child_ids: list[str]) -> None:
    seen = set()
    for proc in params.logits_processors or ():
        hook = getattr(proc, "fork", None)
        if callable(hook) and id(proc) not in seen:
            seen.add(id(proc))
            hook(parent_id, list(child_ids))


def clone_detokenizer(detok, tokenizer):
    """A copy of an incremental detokenizer's state that shares its tokenizer."""
    return None if detok is None else copy.deepcopy(detok, {id(tokenizer): tokenizer})
