"""Log-probs of given tokens, computed in a prefill: vLLM's ``prompt_logprobs`` and
``LLM.score``.

A sequence with ``logprobs_from = a`` needs the log-probs of its tokens at positions
``[a, len)``: the log-softmax of the logits at positions ``[a - 1, len - 1)``, which
its prefill computes (the scheduler reuses no prefix-cache block past position
``a - 1``; an extended held request covers at most ``a - 1``). Per token: its own
log-prob and rank, and the top-N (``SamplingParams.prompt_logprobs``), computed on the
device in chunks of rows; only those [rows, 1 + N] values come back to the host, never
a vocabulary row. The result is ``RequestState.prompt_logprobs`` (vLLM's shape: one
entry per prompt position, None where nothing was computed: the first token, and
everything before an extension).
"""
from __future__ import annotations

import torch

from engine.outputs import Logprob

ROWS_PER_CHUNK = 256     # [256, V] fp32 logits at a time: 33 MB at the 7B vocabulary


def wants_prefill_logprobs(seqs) -> bool:
    return any(s.logprobs_from is not None for s in seqs)


def prefill_logprobs(model, tokenizer, seqs, hidden: torch.Tensor, qsl: list[int]) -> dict[int, list]:
    """For each sequence of a prefill step with ``logprobs_from`` set (index -> its
    ``RequestState.prompt_logprobs``): its tokens' log-probs from the step's hidden states
    [T, H] (rows ``qsl[i]:qsl[i + 1]`` are its computed positions ``num_cached_tokens
    ...``), None before ``logprobs_from``."""
    out = {}
    for i, seq in enumerate(seqs):
        a = seq.logprobs_from
        if a is None:
            continue
        if a >= len(seq):
            out[i] = [None] * len(seq)
            continue
        start = seq.num_cached_tokens
        assert a - 1 >= start, (seq, a, start)
        rows = hidden[qsl[i] + a - 1 - start: qsl[i + 1] - 1]           # positions a-1 .. len-2
        top_n = seq.params.prompt_logprobs or 0
        out[i] = [None] * a + token_logprobs(model, tokenizer, rows, seq.token_ids[a:], top_n)
    return out


@torch.no_grad()
def token_logprobs(model, tokenizer, rows: torch.Tensor, targets: list[int], top_n: int) -> list[dict]:
    """rows [n, H] (final hidden states), targets [n] -> per row {token: Logprob} with
    the target and the top-``top_n``; log-softmax of the raw logits, rank = 1 + the
    number of tokens with a larger logit (the sampler's convention)."""
    ops = model.ops
    dev = rows.device
    ids_all, lps_all, ranks_all = [], [], []
    for s in range(0, rows.shape[0], ROWS_PER_CHUNK):
        logits = model.compute_logits(rows[s:s + ROWS_PER_CHUNK])              # [c, V] fp32
        tgt = torch.tensor(targets[s:s + ROWS_PER_CHUNK], device=dev)[:, None]
        ids = torch.cat([tgt, logits.topk(top_n, dim=-1).indices], dim=1) if top_n else tgt   # [c, K]
        vals = logits.gather(1, ids)
        ranks = torch.stack([(logits > vals[:, k:k + 1]).sum(-1) + 1 for k in range(ids.shape[1])], dim=1)
        ids_all.append(ids)
        lps_all.append(ops.gather_logprobs(logits, ids))
        ranks_all.append(ranks)
    ids = torch.cat(ids_all).tolist()                  # the one device -> host read
    lps = torch.cat(lps_all).tolist()
    ranks = torch.cat(ranks_all).tolist()
    decode = _decoder(tokenizer)
    return [{t: Logprob(v, r, decode(t)) for t, v, r in zip(i, lp, rk)} for i, lp, rk in zip(ids, lps, ranks)]


def _decoder(tokenizer):
    if tokenizer is None:
        return lambda t: None
    cache: dict[int, str] = {}

    def decode(t: int) -> str:
        s = cache.get(t)
        if s is None:
            s = cache[t] = tokenizer.decode([t], skip_special_tokens=False)
        return s
    return decode
