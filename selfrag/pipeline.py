"""``SelfRAG``: adaptive retrieval, passage-parallel critique scoring and
beam-style segment decoding on top of ``engine.LLM``.

Everything goes through the engine's public API: requests (``add_request`` /
``step``), held requests that are forked and extended (``SamplingParams(hold=True)``,
``LLM.fork``, ``LLM.extend``: the question prompt is prefilled once and each passage
branch extends a copy of it; a long-form beam is held and each child extends a copy
with its passage, so only new passages are prefilled), ``logits_processors`` (the
reflection-token grammar) and ``logprob_token_ids`` (the ~16 reflection log-probs per
step, never the vocabulary). It doubles as the model for custom decoding algorithms:
see ``examples/``.

Where this departs from the released Self-RAG code (documented choices):
* retrieval rule: the paper's probability ratio by default; ``rule="reference"``
  reproduces the released log-prob ratio, which nearly always retrieves;
* w_use defaults to the paper's 0.5 (the released script used 1.0);
* reflection log-probs are exact for every step (the released code asked for
  the top 5,000 and scored a missing token as -100);
* long-form: the utility score and the sequence score are really used (the
  released ``run_long_form_static.py`` left utility at 0 and dropped seq),
  siblings never overwrite each other's prompt, segments stop on the
  ``[Retrieval]`` *token* (not its text, which vLLM's default detokenizer
  stripped), and a beam's score is the product (``beam_score="product"``, as
  released) or the sum (``"sum"``) of its segments' final scores.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from engine import SamplingParams
from selfrag.constraints import ReflectionConstraint
from selfrag.prompts import canonical_task, format_passage, format_prompt, postprocess_answer, task_instruction
from selfrag.scoring import aggregate_closed, best_open, retrieval_probability, score_candidate, should_retrieve
from selfrag.types import Candidate, Passage, Result
from selfrag.vocab import ReflectionVocab

CLOSED_TASKS = ("fever", "pubhealth", "arc_c")
MODES = ("adaptive", "always", "never")
RULES = ("paper", "reference")
# n-gram drafts from the sequence and (shared_lookup) from earlier answers, whose phrases
# recur: on the miniature model's short answers 104 steps instead of 156 (bench_speculative)
SPECULATIVE_DEFAULTS = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                        "prompt_lookup_max": 4, "shared_lookup": True}
_run_ids = itertools.count()


class RetrieverError(RuntimeError):
    """The retriever raised for one query (``answer_batch`` fails only that question)."""


@dataclass
class _Branch:
    """One generation request of the search: prompt ids, passage, start state."""

    prompt_ids: list[int]
    passage: Passage | None
    owner: int                       # index of the question / beam it belongs to
    output: object = None            # the engine's CompletionOutput when done
    error: str | None = None         # the engine's message if this request failed
    extra: dict = field(default_factory=dict)
    # Where its KV comes from: a held request (forked when several branches share it)
    # extended with ``prompt_ids[len(its sequence):]``; None: a request of its own.
    source: str | None = None
    extension: list[int] | None = None
    replace_last: bool = False       # the held request's sampled last token gives way
    rid: str | None = None           # its engine request (held after it if params.hold)


class SelfRAG:
    """Self-RAG inference over an ``engine.LLM`` holding a Self-RAG checkpoint.

    retriever: anything with ``retrieve(query, k) -> list[Passage]``; used when
    a call gets no ``passages``.
    """

    def __init__(self, llm, retriever=None, speculative: bool = False):
        """``speculative``: turn on the engine's speculative decoding unless the LLM has it
        (n-gram drafts from the passages in the prompt and from earlier answers, 4 at a
        time, and the grammar's forced tokens; the answers are unchanged)."""
        if speculative and getattr(llm, "speculator", None) is None:
            llm.enable_speculation(SPECULATIVE_DEFAULTS)
        tokenizer = llm.get_tokenizer()
        if tokenizer is None:
            raise ValueError("SelfRAG needs an LLM with a tokenizer (its reflection tokens)")
        self.llm = llm
        self.tokenizer = tokenizer
        self.vocab = ReflectionVocab.from_tokenizer(tokenizer)
        self.retriever = retriever
        self.vocab_size = llm.config.vocab_size

    # ---- engine access -------------------------------------------------------
    def _run(self, branches: list[_Branch], params: SamplingParams,
             constraint: ReflectionConstraint | None) -> None:
        """Runs every branch as one batch of engine requests; fills ``.output``. A
        branch with a ``source`` extends a copy of that held request (forked once per
        extra branch sharing it): only its extension is prefilled."""
        run = next(_run_ids)
        ids = {}

        def start(rid, b):
            if constraint is not None:
                constraint.begin(rid, constraint.start_state_for_prompt(b.prompt_ids))
            b.rid, ids[rid] = rid, b
        try:
            shared: dict[str, list[_Branch]] = {}
            for b in branches:
                if b.source is not None:
                    shared.setdefault(b.source, []).append(b)
            for src, group in shared.items():
                rids = [src] + (self.llm.fork(src, n=len(group) - 1) if len(group) > 1 else [])
                for rid, b in zip(rids, group):
                    start(rid, b)
                    self.llm.extend(rid, b.extension, params, replace_last=b.replace_last)
            for i, b in enumerate(branches):
                if b.source is None:
                    rid = self.llm.add_request({"prompt_token_ids": b.prompt_ids}, params,
                                               request_id=f"selfrag-{run}-{i}")
                    start(rid, b)
            self._wait(ids)
        except BaseException:
            for rid in ids:
                self.llm.abort(rid)
            raise
        finally:
            if constraint is not None:
                for rid in ids:
                    constraint.forget(rid)

    def _wait(self, ids: dict) -> None:
        pending = set(ids)
        while pending:
            for out in self.llm.step():
                if out.finished and out.request_id in pending:
                    ids[out.request_id].output = out.outputs[0]
                    ids[out.request_id].error = out.error
                    pending.discard(out.request_id)
            if pending and not self.llm.has_unfinished_requests():
                raise RuntimeError(f"requests {sorted(pending)} were aborted")

    def _hold(self, prompts_ids: list[list[int]]) -> list[str]:
        """Each prompt prefilled and held (``max_tokens=0``), for branches to extend."""
        branches = [_Branch(ids, None, i) for i, ids in enumerate(prompts_ids)]
        self._run(branches, SamplingParams(max_tokens=0, hold=True), None)
        return [b.rid for b in branches]

    def _release(self, rids) -> None:
        for rid in rids:
            self.llm.release(rid)            # False (nothing to do) once a branch extended it

    @staticmethod
    def _extending(ids: list[int], base: list[int], source: str, replace: bool) -> dict:
        """A branch's source fields when ``ids`` continue ``base`` (the held request's
        sequence; with ``replace``, all of it but its sampled last token)."""
        if source is None or len(ids) <= len(base) or ids[:len(base)] != base:
            return {}
        return dict(source=source, extension=ids[len(base):], replace_last=replace)

    def _params(self, max_tokens: int, constrained: bool, mode: str, stop_ids=(), hold: bool = False):
        constraint = (ReflectionConstraint(self.vocab, self.vocab_size, mode=mode)
                      if constrained else None)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                skip_special_tokens=False,
                                logprob_token_ids=list(self.vocab.scored_ids),
                                stop_token_ids=list(stop_ids) or None,
                                logits_processors=[constraint] if constraint else None, hold=hold)
        return params, constraint

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _passages(self, query: str, given, k: int) -> list[Passage]:
        if given is not None:
            ps = [p if isinstance(p, Passage) else Passage.from_dict(p) for p in given]
            return ps[:k]
        if self.retriever is None:
            raise ValueError("no passages given and no retriever: pass passages=... or "
                             "SelfRAG(llm, retriever=...)")
        try:
            return list(self.retriever.retrieve(query, k))
        except Exception as e:  # noqa: BLE001 - the retriever's own failure
            raise RetrieverError(f"the retriever raised {type(e).__name__}: {e}") from e

    # ---- short form ----------------------------------------------------------
    def retrieval_probabilities(self, prompts_ids: list[list[int]], rule: str = "paper"
                                ) -> list[float]:
        """The retrieval score at the first response position of each prompt."""
        return self._decide(prompts_ids, rule, hold=False)[0]

    def _decide(self, prompts_ids, rule: str, hold: bool) -> tuple[list[float], list[str]]:
        """(retrieval scores, request ids): with ``hold`` the decision requests stay held
        (their one sampled token not computed), for the branches to extend."""
        v = self.vocab
        params = SamplingParams(temperature=0.0, max_tokens=1, hold=hold,
                                logprob_token_ids=[v.retrieval, v.no_retrieval])
        branches = [_Branch(ids, None, i) for i, ids in enumerate(prompts_ids)]
        self._run(branches, params, None)
        errors = [b.error for b in branches if b.error is not None]
        if errors:
            self._release(b.rid for b in branches)
            raise RuntimeError(f"the retrieval decision failed: {errors[0]}")
        return ([retrieval_probability(b.output.logprobs[0], v, rule=rule) for b in branches],
                [b.rid for b in branches])

    def answer(self, question: str, passages=None, k: int = 10, task: str | None = None,
               **kw) -> Result:
        """Short-form Self-RAG for one question; see ``answer_batch``."""
        return self.answer_batch([question], None if passages is None else [passages], k=k,
                                 task=task, **kw)[0]

    def answer_batch(self, questions: list, passages: list | None = None, k: int = 10,
                     task: str | None = None, mode: str = "adaptive", threshold: float = 0.2,
                     rule: str = "paper", w_rel: float = 1.0, w_sup: float = 1.0,
                     w_use: float = 0.5, use_seqscore: bool = True, constrained: bool = True,
                     max_tokens: int = 100, choices: list | None = None) -> list[Result]:
        """Short-form Self-RAG (paper §3.3) for a batch of questions.

        questions: strings (for arc_c also pass ``choices``, one
            ``{"text": [...], "label": [...]}`` per question).
        passages: per question a list of ``Passage`` (or eval ``ctxs`` dicts);
            None: ask the retriever for ``k``.
        mode: "adaptive" (decide from the first-position reflection
            probabilities with ``rule`` and ``threshold``), "always", "never".
        Every branch (one per passage) is generated greedily in one batch; the
        prompt is shared through prefix caching. Open tasks return the best
        branch by final score, closed tasks (fever/pubhealth, arc_c) the answer
        string with the highest summed final score.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {MODES}")
        if rule not in RULES:
            raise ValueError(f"rule={rule!r}: use one of {RULES}")
        task = canonical_task(task)
        if passages is not None and len(passages) != len(questions):
            raise ValueError(f"{len(passages)} passage lists for {len(questions)} questions")
        prompts = [format_prompt(task_instruction(task, q, None if choices is None else choices[i]))
                   for i, q in enumerate(questions)]
        prompt_ids = [self._encode(p) for p in prompts]
        probs: list[float | None] = [None] * len(questions)
        # Each question's prompt is prefilled once and held: by the retrieval decision
        # (whose one sampled token its branches replace), or else by a prefill-only hold.
        if mode == "adaptive":
            probs, sources = self._decide(prompt_ids, rule, hold=True)
            retrieve = [should_retrieve(p, threshold) for p in probs]
        else:
            sources = self._hold(prompt_ids)
            retrieve = [mode == "always"] * len(questions)
        replace = mode == "adaptive"
        try:
            branches, errors = [], {}
            for i, q in enumerate(questions):
                if retrieve[i]:
                    try:
                        found = self._passages(q, None if passages is None else passages[i], k)
                    except RetrieverError as e:             # this question fails, the others go on
                        errors[i] = f"question {i}: {e}"
                        continue
                    for p in found:
                        ids = self._encode(prompts[i] + format_passage(p))
                        branches.append(_Branch(ids, p, i, **self._extending(ids, prompt_ids[i], sources[i],
                                                                              replace)))
                else:
                    ids = prompt_ids[i] + [self.vocab.no_retrieval]
                    branches.append(_Branch(ids, None, i, **self._extending(ids, prompt_ids[i], sources[i],
                                                                             replace)))
            # Constrained branches end at a [Retrieval] the model writes after its
            # critique: short form has no next passage to insert (long form does).
            params, constraint = self._params(max_tokens, constrained, mode,
                                              stop_ids=[self.vocab.retrieval] if constrained else ())
            self._run(branches, params, constraint)
        finally:
            self._release(sources)

        for b in branches:
            if b.error is not None:
                errors.setdefault(b.owner, f"question {b.owner}: {b.error}")
        results = []
        for i in range(len(questions)):
            if i in errors:
                results.append(Result(answer="", retrieved=retrieve[i], retrieval_prob=probs[i],
                                      error=errors[i]))
                continue
            cands = [self._candidate(b, w_rel, w_sup, w_use, use_seqscore)
                     for b in branches if b.owner == i]
            if task in CLOSED_TASKS and retrieve[i]:
                answer = aggregate_closed(cands, task)
            else:
                answer = postprocess_answer(best_open(cands).text)
            results.append(Result(answer=answer, retrieved=retrieve[i], retrieval_prob=probs[i],
                                  candidates=cands))
        return results

    def _candidate(self, b: _Branch, w_rel, w_sup, w_use, use_seqscore) -> Candidate:
        out = b.output
        scores = score_candidate(out.token_ids, out.logprobs, out.cumulative_logprob, self.vocab,
                                 w_rel=w_rel, w_sup=w_sup, w_use=w_use, use_seqscore=use_seqscore)
        return Candidate(passage=b.passage, text=out.text, token_ids=list(out.token_ids),
                         scores=scores)

    # ---- long form -----------------------------------------------------------
    def generate_long(self, question: str, passages=None, k: int = 5, beam_width: int = 2,
                      max_depth: int = 7, segment_tokens: int = 100, task: str | None = None,
                      w_rel: float = 1.0, w_sup: float = 1.0, w_use: float = 0.5,
                      use_seqscore: bool = True, beam_score: str = "product",
                      constrained: bool = True, retrieve_per_segment: bool = False) -> Result:
        """Beam-style segment decoding (paper §3.3, long form).

        Each depth extends every live beam once per passage: the child prompt
        is the beam's prompt and text so far plus ``[Retrieval]<paragraph>…``; the
        beam is a held request, forked per passage and extended, so only the
        passage is prefilled. A segment ends at the
        model's ``[Retrieval]`` token (kept), ``</s>`` or ``segment_tokens``.
        Children are scored like short-form branches; a path's score is the
        product (``beam_score="product"``, the released code's rule) or the sum
        (``"sum"``) of its segments' final scores; the best ``beam_width``
        survive, up to ``max_depth`` segments. With ``retrieve_per_segment`` the
        retriever is asked again per beam with the question plus its text.

        Result: ``answer`` is the best finished path's text with ``[i]`` after
        each segment whose passage ``i`` (1-based) supported it
        (``[Fully supported]``/``[Partially supported]``); ``candidates`` are
        that path's segments; ``tree`` lists every node for inspection.
        """
        if beam_score not in ("product", "sum"):
            raise ValueError(f"beam_score={beam_score!r}: use 'product' or 'sum'")
        if beam_width < 1 or max_depth < 1 or segment_tokens < 1:
            raise ValueError("beam_width, max_depth and segment_tokens must be >= 1")
        v = self.vocab
        prompt = format_prompt(task_instruction(task, question, None))
        base = self._passages(question, passages, k)
        root = {"id": 0, "parent": None, "depth": 0, "passage": None, "text": "",
                "scores": None, "score": 1.0 if beam_score == "product" else 0.0,
                "finished": False, "ctx_ids": self._encode(prompt), "segments": []}
        tree, beams, finished = [root], [root], []
        # Every beam is a held request: the root a prefill-only hold of the prompt, the
        # others the finished segments (their last token sampled, not yet computed).
        root["rid"] = self._hold([root["ctx_ids"]])[0]
        params, constraint = self._params(segment_tokens, constrained, "always", stop_ids=[v.retrieval],
                                          hold=True)
        held = {root["rid"]}
        try:
            for depth in range(1, max_depth + 1):
                branches = []
                for beam in beams:
                    # The child continues the beam's own sequence (prompt, passages and
                    # segments so far) from a copy of its held request: only the passage
                    # is prefilled. A trailing [Retrieval] is re-sent by format_passage.
                    ctx, replace = beam["ctx_ids"], False
                    if ctx[-1] == v.retrieval and beam["parent"] is not None:
                        ctx, replace = ctx[:-1], True
                    cands = base
                    if retrieve_per_segment and self.retriever is not None and beam["text"]:
                        cands = list(self.retriever.retrieve(question + " " + beam["text"], k))
                    for i, p in enumerate(cands):
                        ids = ctx + self.tokenizer.encode(format_passage(p), add_special_tokens=False)
                        branches.append(_Branch(ids, p, beam["id"], extra={"index": i, "beam": beam},
                                                **self._extending(ids, ctx, beam["rid"], replace)))
                used = {b.source for b in branches if b.source is not None}
                self._release(beam["rid"] for beam in beams if beam["rid"] not in used)
                held -= {beam["rid"] for beam in beams}      # each used one becomes a child's
                self._run(branches, params, constraint)
                held |= {b.rid for b in branches}
                children = []
                for b in branches:
                    out, beam = b.output, b.extra["beam"]
                    cand = self._candidate(b, w_rel, w_sup, w_use, use_seqscore)
                    seg = cand.scores.final
                    node = {"id": len(tree), "parent": beam["id"], "depth": depth,
                            "passage": b.extra["index"], "text": out.text, "scores": cand.scores,
                            "score": beam["score"] * seg if beam_score == "product" else beam["score"] + seg,
                            "finished": bool(out.token_ids) and out.token_ids[-1] == v.eos,
                            "ctx_ids": b.prompt_ids + list(out.token_ids), "rid": b.rid,
                            "segments": beam["segments"] + [(cand, b.extra["index"])]}
                    tree.append(node)
                    children.append(node)
                children.sort(key=lambda n: n["score"], reverse=True)
                kept = children[:beam_width]
                for n in kept:
                    n["kept"] = True
                finished += [n for n in kept if n["finished"]]
                beams = [n for n in kept if not n["finished"]]
                dropped = {n["rid"] for n in children} - {n["rid"] for n in beams}
                self._release(dropped)
                held -= dropped
                if not beams:
                    break
        finally:
            self._release(held)
        pool = finished or beams or [root]
        best = max(pool, key=lambda n: n["score"])
        return Result(answer=self._cite(best["segments"]), retrieved=True, retrieval_prob=None,
                      candidates=[c for c, _ in best["segments"]],
                      tree=[_tree_row(n) for n in tree])

    def _cite(self, segments) -> str:
        """Segment texts (reflection tokens removed) with ``[i]`` after each
        segment that its passage supported."""
        supported = {self.vocab.fully, self.vocab.partially}
        parts = []
        for cand, index in segments:
            text = postprocess_answer(cand.text).strip()
            if any(t in supported for t in cand.token_ids):
                text += f" [{index + 1}]"
            parts.append(text)
        return " ".join(p for p in parts if p)


def _tree_row(node: dict) -> dict:
    s = node["scores"]
    return {"id": node["id"], "parent": node["parent"], "depth": node["depth"],
            "passage": node["passage"], "text": node["text"], "score": node["score"],
            "scores": None if s is None else vars(s).copy(), "finished": node["finished"],
            "kept": node.get("kept", node["parent"] is None)}
