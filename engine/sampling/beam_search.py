"""``LLM.beam_search``: HF transformers' beam search (``generate(num_beams=w,
do_sample=False, early_stopping=True, length_penalty=..., num_return_sequences=w)``) on
the engine's primitives, with vLLM's API.

Each running beam is a held request (engine/core/held.py) that has just computed its
next-token distribution: a one-token turn (``max_tokens=1, logprobs=2w``) whose top-2w
raw log-probs hold the beam's share of the step's 2w best continuations. Choosing the
next beams is HF's rule, candidate for candidate:

* the 2w best (beam score + log-prob) continuations over all beams, best first;
* a continuation ending in EOS (or reaching ``max_tokens``) among the first w becomes a
  finished hypothesis scored ``sum of log-probs / generated_len ** length_penalty``,
  unless w hypotheses exist already (``early_stopping=True``) or the early-stop
  heuristic says no running beam can beat the worst of them;
* the w best continuations that did not end become the next running beams;
* a prompt is done when it has w hypotheses, when no running beam can improve on them,
  or when every continuation ended.

A next beam continues its parent by ``fork``: the parent's held request is forked once
per extra child (full KV blocks shared, the partial one copied), the token the beam
search chose replaces the parent's sampled one (which has no KV yet), and ``extend``
computes it; a parent with no child is released first, so a step never holds more
than the w beams' blocks plus the copies. Every beam of every prompt runs in one engine
step; nothing is prefilled twice.

Differences from HF, by choice: candidates come from each beam's top 2w tokens (which
contain HF's 2w over all beams), and exact ties between candidates are broken by beam
then token id where HF's ``topk`` order is unspecified. ``temperature`` must be 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.outputs import Logprob
from engine.sampling_params import SamplingParams, is_int, is_real

NEG = -1.0e9                          # HF's "impossible" score


@dataclass
class BeamSearchParams:
    """vLLM's fields. ``length_penalty``: a hypothesis scores ``cum_logprob /
    generated_len ** length_penalty`` (HF's rule)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self):
        def bad(name, why):
            raise InvalidRequestError(f"BeamSearchParams.{name}={getattr(self, name)!r}: {why}")
        if not is_int(self.beam_width) or self.beam_width < 1:
            bad("beam_width", "must be an integer >= 1")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be True or False")
        if not is_real(self.temperature) or self.temperature != 0:
            bad("temperature", "must be 0: beam search here is deterministic (HF's do_sample=False)")
        if not is_real(self.length_penalty):
            bad("length_penalty", "must be a finite number")


@dataclass
class BeamSearchSequence:
    tokens: list[int]                        # prompt + generated, as vLLM gives them
    logprobs: list[dict[int, Logprob]]       # per generated token: its step's top-2w
    cum_logprob: float
    score: float                             # HF's sequences_scores
    text: str | None = None
    finish_reason: str | None = None         # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)


@dataclass
class _Beam:
    rid: str                                 # its held request
    gen: list[int]
    logprobs: list[dict]
    score: float                             # sum of log-probs


class _Prompt:
    """One prompt's beam-search state (HF's per-batch-item tensors, as lists)."""

    def __init__(self, ids: list[int], rid: str, params: BeamSearchParams):
        self.ids, self.p = ids, params
        self.running = [_Beam(rid, [], [], 0.0)]
        self.finished: list[tuple[float, _Beam, str]] = []      # (score, beam, reason), best first
        self.improvable, self.done = True, False

    def step(self, dists: dict[str, dict[int, Logprob]], eos: int | None) -> list[tuple[_Beam, int, _Beam]]:
        """HF's update from each running beam's top-2w log-probs; returns the next running
        beams as (parent, token, child state)."""
        w, p = self.p.beam_width, self.p
        cands = sorted(((b.score + lp.logprob, i, t) for i, b in enumerate(self.running)
                        for t, lp in dists[b.rid].items()), key=lambda c: (-c[0], c[1], c[2]))[:2 * w]
        gen_len = len(self.running[0].gen) + 1
        hits = [(t == eos and not p.ignore_eos) or gen_len >= p.max_tokens for _, _, t in cands]
        full = len(self.finished) == w
        new_fin = []
        if not full and self.improvable:
            for k, ((s, i, t), hit) in enumerate(zip(cands[:w], hits)):
                if hit:
                    parent = self.running[i]
                    beam = _Beam(parent.rid, parent.gen + [t], parent.logprobs + [dists[parent.rid]], s)
                    new_fin.append((s / gen_len ** p.length_penalty, beam,
                                    "stop" if t == eos and not p.ignore_eos else "length"))
        if new_fin:                  # HF: topk over [existing w slots, then the new ones]
            merged = self.finished + new_fin
            order = sorted(range(len(merged)), key=lambda j: -merged[j][0])[:w]
            self.finished = [merged[j] for j in order]
        live = [(s, i, t) for (s, i, t), hit in zip(cands, hits) if not hit][:w]
        nxt = []
        for s, i, t in live:
            parent = self.running[i]
            nxt.append((parent, t, _Beam(parent.rid, parent.gen + [t], parent.logprobs + [dists[parent.rid]], s)))
        self.running = [c for _, _, c in nxt]
        if len(self.finished) == w and self.running:          # HF's early-stop heuristic
            best = self.running[0].score / gen_len ** p.length_penalty
            self.improvable = self.improvable and best > min(f[0] for f in self.finished)
        self.done = (len(self.finished) == w or not self.improvable or not self.running)
        return nxt


def beam_search(llm, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """The engine side of ``LLM.beam_search`` (see the module docstring)."""
    from engine import request_validation
    from engine.sampling.continuation_logprobs import wait_all
    if not isinstance(params, BeamSearchParams):
        raise InvalidRequestError(f"beam_search: params must be BeamSearchParams, got {type(params).__name__}")
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    w = params.beam_width
    turn = SamplingParams(max_tokens=1, temperature=0, logprobs=2 * w, hold=True, ignore_eos=True)
    states = []
    for prompt in prompts:
        _, ids = request_validation.prompt_ids(prompt, llm.tokenizer, llm.config.vocab_size, llm.max_model_len)
        if len(ids) + params.max_tokens > llm.max_model_len:
            raise InvalidRequestError(f"beam_search: a prompt of {len(ids)} tokens + max_tokens="
                                      f"{params.max_tokens} exceed max_model_len={llm.max_model_len}")
        states.append(_Prompt(ids, None, params))
    pending = []
    try:
        for st in states:
            rid = llm.add_request({"prompt_token_ids": st.ids}, turn)
            st.running[0].rid = rid
            pending.append(rid)
        while pending:
            finals = wait_all(llm, pending)
            dists = {rid: out.outputs[0].logprobs[0] for rid, out in finals.items()}
            pending = []
            for st in states:
                if st.done:
                    continue
                parents = {b.rid for b in st.running}
                nxt = st.step(dists, None if params.ignore_eos else llm.eos_token_id)
                if st.done:
                    nxt = []
                    st.running = []
                pending += _continue(llm, parents, nxt, turn)
    finally:
        for st in states:
            for b in st.running:
                llm.release(b.rid)
        for rid in pending:
            llm.abort(rid)
    return [_output(llm, st) for st in states]


def _continue(llm, parents: set[str], nxt, turn) -> list[str]:
    """Releases the parents no next beam continues, forks the others once per extra
    child, puts each child's chosen token in place of the parent's sampled one (no KV
    yet) and extends it: one token to compute. Returns the new requests' ids."""
    children: dict[str, list] = {}
    for parent, t, beam in nxt:
        children.setdefault(parent.rid, []).append((t, beam))
    for rid in parents - set(children):
        llm.release(rid)
    out = []
    for rid, kids in children.items():
        rids = [rid] + (llm.fork(rid, n=len(kids) - 1) if len(kids) > 1 else [])
        for r, (t, beam) in zip(rids, kids):
            beam.rid = r
            llm.extend(r, [t], turn, replace_last=True)     # the sampled token had no KV
            out.append(r)
    return out


def _output(llm, st: _Prompt) -> BeamSearchOutput:
    seqs = []
    for score, beam, reason in st.finished:
        tokens = st.ids + beam.gen
        text = llm.tokenizer.decode(tokens, skip_special_tokens=True) if llm.tokenizer is not None else None
        seqs.append(BeamSearchSequence(tokens, beam.logprobs, beam.score, score, text, reason))
    return BeamSearchOutput(seqs)
