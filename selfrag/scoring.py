"""Self-RAG critique scores, as pure functions of one generation's engine output.

Inputs are what ``RequestOutput.outputs[0]`` carries: ``token_ids``,
``logprobs`` (one dict per generated token, ``{token_id: Logprob or float}``;
request them with ``SamplingParams(logprob_token_ids=vocab.scored_ids)``) and
``cumulative_logprob``.  A token missing from a step's dict counts as
log-prob -100, as the released code does with its top-5000 lists.

Scores (paper section 3.3 and the released ``run_short_form.py``,
``call_model_rerank_w_scores_batch``; differences noted):

* ``rel`` = p(Rel) / (p(Rel) + p(Irr)) at the FIRST generated position, whatever
  token was generated there (as released).
* ``sup`` = (p(Full) + 0.5 p(Partial)) / (p(Full) + p(Partial) + p(NoSup)) at the
  first position where a support token was GENERATED; 0 if none was.
* ``use`` = sum_k w_k p(U_k) / sum_k p(U_k), w = (-1, -0.5, 0, 0.5, 1), at the
  first generated utility token; 0 if none was.
* ``seq`` = exp(cumulative_logprob / max(len(token_ids), 1)): the geometric mean
  token probability, ``</s>`` included when generated.
* ``final`` = (seq if use_seqscore else 0) + w_rel rel + w_sup sup + w_use use.

The group ratios are computed as a softmax over the group's log-probs (the
same numbers as exp-then-divide, without underflow to 0/0); a group whose
log-probs are all -inf is treated as uniform.

Differences from the released script: it only computes ``sup``/``use`` when run
with ``--use_groundness``/``--use_utility`` (the published commands pass both,
and ``--use_seqscore``); its CLI default is w_use = 1.0 while the function
default, the paper, and ours is 0.5 (pass ``w_use=1.0`` to reproduce the CLI);
``use_seqscore`` defaults to True here, False there.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from selfrag.prompts import CLOSED_TASKS, canonical_task, postprocess_answer
from selfrag.types import Candidate, Scores
from selfrag.vocab import ReflectionVocab

MISSING_LOGPROB = -100.0
UTILITY_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
RETRIEVAL_RULES = ("paper", "reference")

Step = Mapping[int, Any]


def token_logprob(step: Step, token_id: int) -> float:
    """Log-prob of ``token_id`` in one step's dict (a Logprob or a float); -100 if absent."""
    if token_id not in step:
        return MISSING_LOGPROB
    v = step[token_id]
    lp = float(getattr(v, "logprob", v))
    if math.isnan(lp) or lp > 1e-3:   # log-softmax rounding may give tiny positives
        raise ValueError(f"invalid log-prob {lp!r} for token {token_id}")
    return lp


def group_probs(step: Step, ids: Sequence[int]) -> list[float]:
    """p(id) / sum of p over ``ids``, for each id (softmax of their log-probs)."""
    lps = [token_logprob(step, t) for t in ids]
    m = max(lps)
    if m == -math.inf:
        return [1.0 / len(ids)] * len(ids)
    e = [math.exp(lp - m) for lp in lps]
    s = sum(e)
    return [x / s for x in e]


def first_position(token_ids: Sequence[int], ids: Sequence[int]) -> int | None:
    """Index of the first generated token that is one of ``ids`` (None if none)."""
    wanted = set(ids)
    for i, t in enumerate(token_ids):
        if t in wanted:
            return i
    return None


def _check(token_ids: Sequence[int], logprobs: Sequence[Step] | None) -> None:
    if logprobs is None:
        raise ValueError("no log-probs: generate with SamplingParams(logprob_token_ids=vocab.scored_ids)")
    if len(logprobs) != len(token_ids):
        raise ValueError(f"{len(token_ids)} token ids but {len(logprobs)} log-prob steps")


def relevance_score(logprobs: Sequence[Step], vocab: ReflectionVocab) -> float:
    """p(Rel)/(p(Rel)+p(Irr)) at the first position (no position at all: both missing, 0.5)."""
    step = logprobs[0] if logprobs else {}
    return group_probs(step, [vocab.relevant, vocab.irrelevant])[0]


def support_score(token_ids: Sequence[int], logprobs: Sequence[Step], vocab: ReflectionVocab) -> float:
    """(p(Full) + 0.5 p(Partial)) / sum at the first generated support token; 0 if none."""
    i = first_position(token_ids, vocab.support_group)
    if i is None:
        return 0.0
    full, partial, _ = group_probs(logprobs[i], [vocab.fully, vocab.partially, vocab.no_support])
    return full + 0.5 * partial


def utility_score(token_ids: Sequence[int], logprobs: Sequence[Step], vocab: ReflectionVocab) -> float:
    """sum_k w_k p(U_k)/sum p(U) at the first generated utility token; 0 if none."""
    i = first_position(token_ids, vocab.utility)
    if i is None:
        return 0.0
    return sum(w * p for w, p in zip(UTILITY_WEIGHTS, group_probs(logprobs[i], vocab.utility)))


def sequence_score(cumulative_logprob: float, num_tokens: int) -> float:
    """exp(mean token log-prob) = exp(cumulative_logprob / max(num_tokens, 1))."""
    return math.exp(float(cumulative_logprob) / max(int(num_tokens), 1))


def score_candidate(token_ids: Sequence[int], logprobs: Sequence[Step] | None, cumulative_logprob: float,
                    vocab: ReflectionVocab, w_rel: float = 1.0, w_sup: float = 1.0, w_use: float = 0.5,
                    use_seqscore: bool = True) -> Scores:
    """All critique scores of one generation (module docstring has the formulas)."""
    _check(token_ids, logprobs)
    rel = relevance_score(logprobs, vocab)
    sup = support_score(token_ids, logprobs, vocab)
    use = utility_score(token_ids, logprobs, vocab)
    seq = sequence_score(cumulative_logprob, len(token_ids))
    final = (seq if use_seqscore else 0.0) + w_rel * rel + w_sup * sup + w_use * use
    return Scores(rel=rel, sup=sup, use=use, seq=seq, final=final)


def retrieval_probability(step_logprobs: Step, vocab: ReflectionVocab, rule: str = "paper") -> float:
    """The adaptive-retrieval value from the first step's log-probs.

    ``"paper"``: p(Ret) / (p(Ret) + p(NoRet)) with probabilities.

    ``"reference"``: the released code's ratio of LOG-probs,
    lp(Ret) / (lp(Ret) + lp(NoRet)).  Both are <= 0, so the value is in [0, 1]
    but it is inverted: it is > t exactly when lp(Ret) < t/(1-t) * lp(NoRet)
    (for t = 0.2: p(Ret) < p(NoRet)**0.25), i.e. the
    more confident the model is about retrieving, the smaller the value.  As
    reported for the released 7B model it nearly always exceeds the 0.2
    threshold, so adaptive retrieval equals always-retrieve in practice.
    Limits: lp(Ret) = -inf -> 1, lp(NoRet) = -inf -> 0, both -inf (or both 0) -> 0.5.
    """
    if rule == "paper":
        return group_probs(step_logprobs, [vocab.retrieval, vocab.no_retrieval])[0]
    if rule == "reference":
        a = -token_logprob(step_logprobs, vocab.retrieval)
        b = -token_logprob(step_logprobs, vocab.no_retrieval)
        if (math.isinf(a) and math.isinf(b)) or a + b == 0:
            return 0.5
        if math.isinf(a):
            return 1.0
        if math.isinf(b):
            return 0.0
        return a / (a + b)
    raise ValueError(f"unknown retrieval rule {rule!r}; use one of {RETRIEVAL_RULES}")


def should_retrieve(prob: float, threshold: float) -> bool:
    """Retrieve when ``prob > threshold`` (strict, as released)."""
    for name, v in (("prob", prob), ("threshold", threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ValueError(f"{name} must be a number, got {v!r}")
    return prob > threshold


def _final(c: Candidate) -> float:
    f = float(c.scores.final)
    if math.isnan(f):
        raise ValueError(f"candidate {c.text!r} has a NaN final score")
    return f


def aggregate_closed(candidates: Sequence[Candidate], task: str) -> str:
    """Closed tasks: sum final scores per ``postprocess_answer(text)``; return the best answer.

    Ties go to the answer seen first (the released code's stable sort).  The
    returned string is post-processed but not yet ``normalize_closed_answer``-ed
    (the released code maps SUPPORTS/REFUTES after choosing, in its metric
    step).  Difference: the released code keys answers before dropping a
    leading "#"/":", so "#true" and "true" were separate answers there.
    """
    if canonical_task(task) not in CLOSED_TASKS:
        raise ValueError(f"aggregate_closed is for the closed tasks {CLOSED_TASKS}, not {task!r}")
    if not candidates:
        raise ValueError("no candidates to aggregate")
    totals: dict[str, float] = {}
    for c in candidates:
        key = postprocess_answer(c.text)
        totals[key] = totals.get(key, 0.0) + _final(c)
    best = max(totals.values())
    return next(a for a, s in totals.items() if s == best)


def best_open(candidates: Sequence[Candidate]) -> Candidate:
    """Open tasks: the candidate with the highest final score (first one on ties)."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    best = max(_final(c) for c in candidates)
    return next(c for c in candidates if _final(c) == best)
