"""``SamplingParams(n=k)``: one prefill, then k samples that share its KV.

When a request with ``n > 1`` is prefilled for the first time, the step's logits row of
its last prompt token is used k times: before the step runs, the request's sequence is
forked k - 1 times (``BlockManager.fork``: the prompt's full blocks are shared, its
partial last block copied once the forward has written it), and each copy samples its
own first token from the same row. The samples then decode as separate sequences;
``RequestOutput.outputs`` holds k ``CompletionOutput``s (``index`` 0 ... k-1), and the
request is finished when all are.

Seeds: with ``seed=s``, sample i draws from a generator seeded with ``s + i``
(``Sequence.seed_offset``), so each is reproducible and they differ from one another. Greedy with ``n > 1`` gives k
identical completions, as vLLM does. A sample that cannot share (the batch is full, or
no block is free for the copy) is queued and prefilled on its own later; nothing else
changes. Inside the engine the samples are requests ``"<id>#i"``; ``abort(<id>)`` ends
them all.
"""
from __future__ import annotations

from engine.core.sequence import Sequence, SequenceStatus
from engine.outputs import RequestOutput


class SampleGroup:
    """The k samples of one request; builds its ``RequestOutput``."""

    def __init__(self, members: list):
        self.members = members                  # RequestStates, sample i at index i

    @property
    def finished(self) -> bool:
        return all(m.seq.is_finished for m in self.members)

    def output(self) -> RequestOutput:
        first = self.members[0]
        error = next((m.error for m in self.members if m.error is not None), None)
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids,
                             [m.completion(i) for i, m in enumerate(self.members)], self.finished, error,
                             first.prompt_logprobs)


def plan_samples(core, batch) -> None:
    """Before a prefill step runs: every first-time ``n > 1`` request of ``batch`` gets its
    other k - 1 samples, which sample from its prompt's last row in this same step.
    Sets ``batch.sample_seqs`` / ``sample_rows`` (each sample's row of the step's logits)
    and ``batch.block_copies`` (the samples' copies of the partial last prompt block,
    made after the forward has written it); leaves them unset when there is nothing to
    expand. A sample that cannot join the batch (it is full, or no block is free for the
    copy) is queued and prefilled on its own later."""
    if not any(s.params.n > 1 and s.num_generated_tokens == 0 for s in batch.seqs):
        return
    sched, bm, requests = core.scheduler, core.block_manager, core.requests
    out_seqs, rows = [], []
    for i, seq in enumerate(batch.seqs):
        out_seqs.append(seq)
        rows.append(i)
        req = requests.get(seq.request_id)
        if seq.params.n == 1 or req is None or req.group is not None:
            continue
        members = [req]
        for k in range(1, seq.params.n):
            child = Sequence(list(seq.token_ids), f"{seq.request_id}#{k}", seq.params)
            child.seed_offset = k                   # a seeded request's sample k draws from seed + k
            creq = req.fork(child, False)
            requests[child.request_id] = creq
            members.append(creq)
            if len(sched.running) < sched.max_num_seqs and bm.can_fork(seq):
                batch.block_copies.extend(bm.fork(seq, child))
                child.status = SequenceStatus.RUNNING
                sched.running.append(child)
                out_seqs.append(child)
                rows.append(i)
            else:
                sched.add(child)                # prefilled on its own, samples then
        group = SampleGroup(members)
        for m in members:
            m.group = group
    if len(rows) > len(batch.seqs):
        batch.sample_seqs, batch.sample_rows = out_seqs, rows


def last_per_request(outputs: list) -> list:
    """One output per request id, the latest (a step may advance several samples of one
    request), in the order of their latest; ``outputs`` itself when no id repeats."""
    if len(outputs) < 2 or len({o.request_id for o in outputs}) == len(outputs):
        return outputs
    seen, keep = set(), []
    for o in reversed(outputs):
        if o.request_id not in seen:
            seen.add(o.request_id)
            keep.append(o)
    return keep[::-1]
