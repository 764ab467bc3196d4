"""``SamplingParams(n=k)``: one prefill, then k samples that share its KV.

When a request with ``n > 1`` has just been prefilled for the first time, the step's
logits row of its last prompt token is used k times: the request's sequence is forked
k - 1 times right there (``BlockManager.fork``: the prompt's full blocks are shared, its
partial last block copied), and each copy samples its own first token from the same
row. The samples then decode as separate sequences; ``RequestOutput.outputs`` holds k
``CompletionOutput``s (``index`` 0 ... k-1), and the request is finished when all are.

Seeds: with ``seed=s``, sample i draws from a generator seeded with ``s + i``, so each
is reproducible and they differ from one another. Greedy with ``n > 1`` gives k
identical completions, as vLLM does. A sample that cannot share (the batch is full, or
no block is free for the copy) is queued and prefilled on its own later; nothing else
changes. Inside the engine the samples are requests ``"<id>#i"``; ``abort(<id>)`` ends
them all.
"""
from __future__ import annotations

import torch

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
        return RequestOutput(first.request_id, first.prompt, first._prompt_ids,
                             [m.completion(i) for i, m in enumerate(self.members)], self.finished, error,
                             first.prompt_logprobs)


def needs_expansion(seqs) -> bool:
    return any(s.params.n > 1 and s.num_generated_tokens == 0 for s in seqs)


def expand_samples(llm, seqs: list[Sequence], logits: torch.Tensor):
    """(sequences, logits rows) of a prefill step with every first-time ``n > 1`` request
    expanded into its samples, each repeating its parent's row."""
    sched, bm = llm.scheduler, llm.block_manager
    out_seqs, rows = [], []
    for i, seq in enumerate(seqs):
        out_seqs.append(seq)
        rows.append(i)
        req = llm._requests.get(seq.request_id)
        if seq.params.n == 1 or req is None or req.group is not None:
            continue
        members = [req]
        for k in range(1, seq.params.n):
            child = Sequence(list(seq.token_ids), f"{seq.request_id}#{k}", seq.params)
            if seq.params.seed is not None:
                child.sampler_state = torch.Generator(device=llm.sampler.device).manual_seed(seq.params.seed + k)
            creq = req.fork(child, False)
            llm._requests[child.request_id] = creq
            members.append(creq)
            if len(sched.running) < sched.max_num_seqs and bm.can_fork(seq):
                llm.runner.copy_blocks(bm.fork(seq, child))
                child.status = SequenceStatus.RUNNING
                sched.running.append(child)
                out_seqs.append(child)
                rows.append(i)
            else:
                sched.add(child)                # prefilled on its own, samples then
        group = SampleGroup(members)
        for m in members:
            m.group = group
    if len(rows) == len(seqs):
        return seqs, logits
    return out_seqs, logits.index_select(0, torch.tensor(rows, device=logits.device))


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
