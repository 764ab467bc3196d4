"""ReflectionConstraint: the grammar table, incremental tracking, and parity with HF.

The expectations here are written independently of ``selfrag/constraints.py``:
``ORACLE_NEXT`` / ``oracle_allowed`` restate the grammar by token name, and the
property test checks the processor against them on random logits and histories.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine import SamplingParams
from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
from selfrag.constraints import MODES, ReflectionConstraint, State
from selfrag.default_model import random_model_dir
from selfrag.vocab import ReflectionVocab
from tests.helpers import hf_model, make_llm

S = State


@pytest.fixture(scope="module")
def model_dir():
    return random_model_dir()


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def vocab(tok):
    return ReflectionVocab.from_tokenizer(tok)


V = 1016        # the embedded default's vocabulary (checked in test_vocab_size)


def test_vocab_size(tok):
    assert len(tok) == V


# ----------------------------------------------------------------- the oracle
def name_ids(v) -> dict[str, int]:
    return {"noret": v.no_retrieval, "ret": v.retrieval, "cont": v.continue_evidence,
            "rel": v.relevant, "irr": v.irrelevant, "popen": v.paragraph_open,
            "pclose": v.paragraph_close, "full": v.fully, "part": v.partially,
            "nosup": v.no_support, "pad": v.pad, "eos": v.eos,
            **{f"u{k + 1}": t for k, t in enumerate(v.utility)}}


UTIL = ["u1", "u2", "u3", "u4", "u5"]
ORACLE_NEXT = {"noret": S.FREE_TEXT, "ret": S.AWAIT_PARAGRAPH, "popen": S.IN_PARAGRAPH,
               "pclose": S.AFTER_PARAGRAPH, "rel": S.EVIDENCE_TEXT, "irr": S.EVIDENCE_TEXT,
               "cont": S.EVIDENCE_TEXT, "full": S.AFTER_SUPPORT, "part": S.AFTER_SUPPORT,
               "nosup": S.AFTER_SUPPORT, "eos": S.DONE, **{u: S.AFTER_UTILITY for u in UTIL}}
TEXT_STATES = {S.IN_PARAGRAPH, S.EVIDENCE_TEXT, S.FREE_TEXT}


def oracle_special(state: State, mode: str) -> set[str]:
    """Allowed non-text tokens, by name, straight from the spec."""
    ret = set() if mode == "never" else {"ret"}
    return {
        S.START: {"adaptive": {"ret", "noret"}, "always": {"ret"}, "never": {"noret"}}[mode],
        S.AWAIT_PARAGRAPH: {"popen"},
        S.IN_PARAGRAPH: {"pclose"},
        S.AFTER_PARAGRAPH: {"rel", "irr"},
        S.EVIDENCE_TEXT: {"eos", "full", "part", "nosup"},
        S.FREE_TEXT: {"eos", *UTIL},
        S.AFTER_SUPPORT: {*UTIL, "cont", *ret},
        S.AFTER_UTILITY: {"eos"},
        S.DONE: {"eos"},
    }[state]


def oracle_allowed(v, state: State, mode: str, token: int) -> bool:
    by_id = {i: n for n, i in name_ids(v).items()}
    if token in by_id:
        return by_id[token] in oracle_special(state, mode)
    return state in TEXT_STATES


_MASKS: dict = {}


def oracle_mask(v, state: State, mode: str) -> torch.Tensor:
    """``oracle_allowed`` over the whole vocabulary, as a boolean [V] (memoised)."""
    key = (id(v), state, mode)
    if key not in _MASKS:
        _MASKS[key] = torch.tensor([oracle_allowed(v, state, mode, t) for t in range(V)])
    return _MASKS[key]


def oracle_state(v, history, start: State) -> State:
    """Forward walk, one token at a time."""
    by_id = {i: n for n, i in name_ids(v).items()}
    state = start
    for t in history:
        state = ORACLE_NEXT.get(by_id.get(t), state)
    return state


# -------------------------------------------------------------- property test
TEXT_IDS = [3, 4, 17, 250, 999]


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(MODES), start=st.sampled_from(list(State)),
       hist_idx=st.lists(st.lists(st.integers(0, 21), max_size=14), min_size=1, max_size=4),
       chunks=st.lists(st.integers(1, 3), min_size=20, max_size=20),
       seed=st.integers(0, 2**31 - 1))
def test_property_never_leaks_and_tracks_exactly(vocab, mode, start, hist_idx, chunks, seed):
    pool = sorted(name_ids(vocab).values()) + TEXT_IDS          # 17 special + 5 text ids
    hists = [[pool[i] for i in h] for h in hist_idx]
    proc = ReflectionConstraint(vocab, V, mode=mode)
    rids = [f"r{i}" for i in range(len(hists))]
    for rid in rids:
        proc.begin(rid, start)
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(name_ids(vocab).values()))
    lens = [0] * len(hists)
    for step in range(len(chunks) + 1):
        raw = torch.randn(len(hists), V, generator=g)
        raw[:, special] += 8 * torch.rand(len(hists), len(special), generator=g)  # tempt it
        outs = [h[:n] for h, n in zip(hists, lens)]
        got = proc(raw.clone(), rids, outs)
        for r, (rid, out) in enumerate(zip(rids, outs)):
            want = oracle_state(vocab, out, start)
            assert proc.state_after(out, start) == want
            tracked = proc.state_of(rid)
            # rows whose output forced </s> are forgotten at once; all others are tracked
            forced = want in (S.AFTER_UTILITY, S.DONE) and oracle_state(vocab, out, None) is not None
            assert tracked == (None if forced else want)
            ok = oracle_mask(vocab, want, mode)
            assert oracle_allowed(vocab, want, mode, int(got[r].argmax()))
            assert torch.equal(got[r][ok], raw[r][ok])
            assert bool(torch.isneginf(got[r][~ok]).all())
        if step < len(chunks):
            lens = [min(n + chunks[step], len(h)) for n, h in zip(lens, hists)]


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(MODES), start=st.sampled_from(list(State)),
       hist_idx=st.lists(st.integers(0, 21), max_size=16))
def test_device_grammar_tables_agree_with_the_oracle(vocab, mode, start, hist_idx):
    """The tables the engine runs on the device (async scheduling) are the grammar: each
    prefix's state moved by the next token through ``next_state`` is the oracle's state
    after it, and ``forbidden`` is the complement of the oracle's mask."""
    pool = sorted(name_ids(vocab).values()) + TEXT_IDS
    hist = [pool[i] for i in hist_idx]
    proc = ReflectionConstraint(vocab, V, mode=mode)
    proc.begin("r", start)
    forbidden, nxt = proc.grammar_tables("cpu")
    assert forbidden.shape == nxt.shape == (len(State), V)
    for n in range(len(hist)):
        before = proc.grammar_state("r", hist[:n])
        assert before == oracle_state(vocab, hist[:n], start)
        assert int(nxt[before, hist[n]]) == oracle_state(vocab, hist[:n + 1], start)
    for s in State:
        assert torch.equal(~forbidden[s], oracle_mask(vocab, s, mode)), (mode, s)


def test_allowed_table_matches_oracle(vocab):
    for mode in MODES:
        proc = ReflectionConstraint(vocab, V, mode=mode)
        for s in State:
            assert torch.equal(proc.allowed(s), oracle_mask(vocab, s, mode)), (mode, s)


# ---------------------------------------------------------- hand-written walks
def walk(proc, tokens, start):
    """States before each token; asserts every token is allowed where it is written."""
    states, state = [], start
    for t in tokens:
        assert bool(proc.allowed(state)[t]), (state, t)
        states.append(state)
        state = proc.next_state(state, t)
    return states + [state]


def test_model_card_example(vocab, tok):
    text = tok.encode("Alpacas are considerably smaller than llamas.", add_special_tokens=False)
    seq = [vocab.relevant, *text, vocab.fully, vocab.utility[4], vocab.eos]
    proc = ReflectionConstraint(vocab, V)
    states = walk(proc, seq, S.AFTER_PARAGRAPH)
    assert states == ([S.AFTER_PARAGRAPH] + [S.EVIDENCE_TEXT] * (len(text) + 1)
                      + [S.AFTER_SUPPORT, S.AFTER_UTILITY, S.DONE])
    # the text itself is not allowed right after </paragraph>, nor a support token
    assert not proc.allowed(S.AFTER_PARAGRAPH)[text[0]]
    assert not proc.allowed(S.AFTER_PARAGRAPH)[vocab.fully]


def test_continue_loop(vocab, tok):
    a = tok.encode("First part.", add_special_tokens=False)
    b = tok.encode("More from the same passage.", add_special_tokens=False)
    seq = [vocab.irrelevant, *a, vocab.partially, vocab.continue_evidence, *b, vocab.no_support,
           vocab.continue_evidence, *a, vocab.fully, vocab.utility[3], vocab.eos]
    proc = ReflectionConstraint(vocab, V)
    states = walk(proc, seq, S.AFTER_PARAGRAPH)
    assert states[-1] is S.DONE
    i = seq.index(vocab.continue_evidence)
    assert states[i] is S.AFTER_SUPPORT and states[i + 1] is S.EVIDENCE_TEXT
    # inside evidence text: no utility, no relevance, no retrieval decision, no markup
    for bad in [*vocab.utility, vocab.relevant, vocab.retrieval, vocab.no_retrieval,
                vocab.continue_evidence, vocab.paragraph_open, vocab.paragraph_close, vocab.pad]:
        assert not proc.allowed(S.EVIDENCE_TEXT)[bad]
    assert proc.allowed(S.EVIDENCE_TEXT)[vocab.eos] and proc.allowed(S.EVIDENCE_TEXT)[a[0]]


def test_retrieval_by_mode(vocab):
    ada, never, always = (ReflectionConstraint(vocab, V, mode=m) for m in ("adaptive", "never", "always"))

    def start(p):
        return set(torch.nonzero(p.allowed(S.START)).flatten().tolist())
    assert start(ada) == {vocab.retrieval, vocab.no_retrieval}
    assert start(never) == {vocab.no_retrieval}
    assert start(always) == {vocab.retrieval}
    assert ada.allowed(S.AFTER_SUPPORT)[vocab.retrieval]
    assert always.allowed(S.AFTER_SUPPORT)[vocab.retrieval]
    for s in State:
        assert not never.allowed(s)[vocab.retrieval]
    # [Retrieval] after a segment leads to a new passage, then a relevance token
    seq = [vocab.relevant, 10, vocab.fully, vocab.retrieval, vocab.paragraph_open, 11, 12,
           vocab.paragraph_close, vocab.irrelevant, 13, vocab.no_support, vocab.utility[0], vocab.eos]
    assert walk(ada, seq, S.AFTER_PARAGRAPH)[-1] is S.DONE
    with pytest.raises(AssertionError):
        walk(never, seq, S.AFTER_PARAGRAPH)
    # no retrieval: free text, then utility
    assert walk(never, [vocab.no_retrieval, 10, 11, vocab.utility[2], vocab.eos], S.START)[1:] == [
        S.FREE_TEXT, S.FREE_TEXT, S.FREE_TEXT, S.AFTER_UTILITY, S.DONE]


def test_utility_then_eos_and_cleanup(vocab):
    proc = ReflectionConstraint(vocab, V)
    proc.begin("x", S.FREE_TEXT)
    logits = proc(torch.zeros(1, V), ["x"], [[5, 6, vocab.utility[1]]])
    assert torch.nonzero(torch.isfinite(logits[0])).flatten().tolist() == [vocab.eos]
    assert proc.num_tracked == 0            # forced </s>: bookkeeping dropped at once
    proc.begin("y", S.FREE_TEXT)
    proc(torch.zeros(1, V), ["y"], [[5]])
    assert proc.state_of("y") is S.FREE_TEXT and proc.num_tracked == 1
    proc.forget("y")
    assert proc.num_tracked == 0 and proc.state_of("y") is None


def test_start_state_for_prompt(vocab, tok):
    proc = ReflectionConstraint(vocab, V)

    def enc(s):
        return tok.encode("### Instruction:\nQ\n\n### Response:\n" + s)
    assert proc.start_state_for_prompt(enc("[Retrieval]<paragraph>T\nx</paragraph>")) is S.AFTER_PARAGRAPH
    assert proc.start_state_for_prompt(enc("[No Retrieval]")) is S.FREE_TEXT
    assert proc.start_state_for_prompt(enc("[Relevant]a b.[Fully supported][Continue to Use Evidence]")) \
        is S.EVIDENCE_TEXT
    assert proc.start_state_for_prompt(enc("")) is S.START
    assert proc.start_state_for_prompt([]) is S.START


def test_incremental_equals_scratch_and_batch_equals_rows(vocab):
    v = vocab
    hist = {"a": [v.relevant, 7, 8, v.fully, v.continue_evidence, 9],
            "b": [10, 11], "c": [v.irrelevant, 12, v.partially]}
    starts = {"a": S.AFTER_PARAGRAPH, "b": S.FREE_TEXT, "c": S.AFTER_PARAGRAPH}
    batch = ReflectionConstraint(v, V)
    for r, s in starts.items():
        batch.begin(r, s)
    raw = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    for n in range(7):
        outs = [hist[r][:n] for r in hist]
        got = batch(raw.clone(), list(hist), outs)
        for i, r in enumerate(hist):
            fresh = ReflectionConstraint(v, V)          # recomputed from scratch
            fresh.begin(r, starts[r])
            assert torch.equal(got[i], fresh(raw[i:i + 1].clone(), [r], [outs[i]])[0])
            assert batch.state_of(r) is fresh.state_of(r)


def test_bad_input(vocab):
    with pytest.raises(ValueError, match="mode"):
        ReflectionConstraint(vocab, V, mode="sometimes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ReflectionConstraint(vocab, 1000)
    import dataclasses
    with pytest.raises(ValueError, match="distinct"):
        ReflectionConstraint(dataclasses.replace(vocab, fully=vocab.partially), V)
    proc = ReflectionConstraint(vocab, V)
    with pytest.raises(ValueError, match=r"\[n, 1016\]"):
        proc(torch.zeros(2, 10), ["a", "b"], [[], []])
    with pytest.raises(ValueError, match="must match"):
        proc(torch.zeros(2, V), ["a"], [[], []])


# ------------------------------------------------------------ HF and the engine
@pytest.fixture(scope="module")
def hf(model_dir):
    return hf_model(model_dir, dtype=torch.float32)       # on the test device (CPU by default)


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir, dtype="float32")           # device="cpu" unless the GPU check


@torch.no_grad()
def hf_constrained(model, proc, prompt, start, max_new=24):
    """Greedy HF loop applying the processor's own mask function each step; stops at </s>."""
    dev = next(model.parameters()).device
    out = model(torch.tensor([prompt], device=dev), use_cache=True)
    past, logits, tokens = out.past_key_values, out.logits[0, -1], []
    for _ in range(max_new):
        state = proc.state_after(tokens, start)
        nxt = int(proc.mask_logits(logits.float(), state).argmax())
        tokens.append(nxt)
        if nxt == proc.vocab.eos:
            break
        out = model(torch.tensor([[nxt]], device=dev), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return tokens


def params(proc):
    return SamplingParams(temperature=0, max_tokens=24, logits_processors=[proc],
                          skip_special_tokens=False)


def engine_steps(llm, proc, prompts, tag):
    """All prompts queued at once (one batch, one shared processor) via the step API,
    each with its start state registered by ``begin``."""
    done = {}
    for i, p in enumerate(prompts):
        proc.begin(f"{tag}{i}", proc.start_state_for_prompt(p))
        llm.add_request({"prompt_token_ids": p}, params(proc), request_id=f"{tag}{i}")
    while llm.has_unfinished_requests():
        for o in llm.step():
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
    return [done[f"{tag}{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def prompts(tok):
    head = "### Instruction:\n{}\n\n### Response:\n"
    alpaca, hamlet = "What is an alpaca?", "Who wrote Hamlet?"
    out = [tok.encode(head.format(alpaca) + "[Retrieval]<paragraph>Alpaca\nThe alpaca is a "
                      "species of South American camelid.</paragraph>"),
           tok.encode(head.format(hamlet) + "[Retrieval]<paragraph>Hamlet\nHamlet is a tragedy "
                      "by Shakespeare.</paragraph>"),
           tok.encode(head.format(hamlet) + "[No Retrieval]")]
    out.append(tok.encode(head.format(alpaca)))                 # START
    return out


def check_grammar(proc, prompt, ids):
    state = proc.start_state_for_prompt(prompt)
    for t in ids:
        assert proc.allowed(state)[t], (state, t, ids)
        state = proc.next_state(state, t)


@pytest.mark.parametrize("mode", MODES)
def test_engine_matches_hf(vocab, hf, llm, prompts, mode):
    """One batch of mixed start states sharing one processor == HF greedy with the mask,
    token for token, and every token obeys the grammar.  In adaptive mode also: each
    prompt alone == the batch, and the grammar changed some output."""
    proc = ReflectionConstraint(vocab, V, mode=mode)
    ref = [hf_constrained(hf, proc, p, proc.start_state_for_prompt(p)) for p in prompts]
    assert engine_steps(llm, proc, prompts, f"{mode}-batch-") == ref
    for p, ids in zip(prompts, ref):
        check_grammar(proc, p, ids)
        assert ids[-1] == vocab.eos or len(ids) == 24
    if mode == "always":
        assert ref[-1][0] == vocab.retrieval
    if mode == "never":
        assert vocab.retrieval not in sum(ref, [])
    if mode != "adaptive":
        return
    single = [engine_steps(llm, proc, [p], f"one{i}-")[0] for i, p in enumerate(prompts)]
    assert single == ref
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert any(list(o.outputs[0].token_ids) != r for o, r in zip(plain, ref))


def test_generate_batch_with_default_state(vocab, hf, llm, prompts):
    """``generate`` assigns its own request ids: prompts sharing a start state share
    one processor whose ``default_state`` is that state."""
    ends = [p for p in prompts if p[-1] == vocab.paragraph_close]
    proc = ReflectionConstraint(vocab, V, default_state=S.AFTER_PARAGRAPH)
    ref = [hf_constrained(hf, proc, p, S.AFTER_PARAGRAPH) for p in ends]
    outs = llm.generate([{"prompt_token_ids": p} for p in ends], params(proc), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == ref
    one = [list(llm.generate([{"prompt_token_ids": p}], params(proc), use_tqdm=False)[0]
                .outputs[0].token_ids) for p in ends]
    assert one == ref
    assert all(ids[0] in (vocab.relevant, vocab.irrelevant) for ids in ref)


def test_fork_hook_copies_the_state_and_children_advance_alone(vocab, tok):
    """LLM.fork's hook: a child starts in the parent's state (a START-registered request
    mid-evidence) and then advances on its own tokens; the reference is a request that
    saw the child's whole output from the start."""
    text = tok.encode("Alpacas are small.", add_special_tokens=False)
    proc = ReflectionConstraint(vocab, V)
    proc.begin("p", S.AFTER_PARAGRAPH)
    row = torch.zeros(1, V)
    out = [vocab.relevant, *text]
    proc(row, ["p"], [out])
    assert proc.state_of("p") is S.EVIDENCE_TEXT
    proc.fork("p", ["p.1", "p.2"])
    assert proc.state_of("p.1") is proc.state_of("p.2") is S.EVIDENCE_TEXT
    proc(row.repeat(2, 1), ["p", "p.1"], [out + [vocab.fully], out + text])
    assert proc.state_of("p") is S.AFTER_SUPPORT and proc.state_of("p.1") is S.EVIDENCE_TEXT
    ref = ReflectionConstraint(vocab, V)
    ref.begin("r", S.AFTER_PARAGRAPH)
    ref(row, ["r"], [out + text])
    assert ref.state_of("r") is proc.state_of("p.1")
    proc.forget("p.2")
    assert proc.state_of("p.2") is None and proc.state_of("p") is S.AFTER_SUPPORT


def test_position_safe_under_a_rewind(vocab, tok):
    """A verify step shows a request's output grown by several drafts, then the next step
    a shorter one (drafts rejected): the state must be that of the output given, as a
    fresh constraint computes it."""
    text = tok.encode("Alpacas are small.", add_special_tokens=False)
    full = [vocab.relevant, *text, vocab.fully, vocab.utility[3]]
    proc = ReflectionConstraint(vocab, V)
    proc.begin("r", S.AFTER_PARAGRAPH)
    row = torch.zeros(1, V)
    for cut in (1, 3, len(full), 2, len(full) - 1, 1, len(full)):     # grows, shrinks, grows
        proc(row, ["r"], [full[:cut]])
        ref = ReflectionConstraint(vocab, V)
        ref.begin("r", S.AFTER_PARAGRAPH)
        ref(row, ["r"], [full[:cut]])
        assert proc.state_of("r") is ref.state_of("r"), cut
