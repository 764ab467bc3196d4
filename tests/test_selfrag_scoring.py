"""Self-RAG scoring, types, vocab and prompts: hand-computed expectations, no model.

Log-prob tables are built from chosen probabilities (``log(p)``), so every
expected score below is a small fraction worked out by hand in the comments.
Prompt strings are copied from the released code (AkariAsai/self-rag,
``retrieval_lm/utils.py``, ``run_short_form.py``, ``run_long_form_static.py``).
"""

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from engine.outputs import Logprob
from engine.tokenizer.sentencepiece_tokenizer import AddedToken, Tokenizer
from selfrag import tokens as T
from selfrag.default_model import random_model_dir
from selfrag.prompts import format_passage, format_prompt, normalize_closed_answer, postprocess_answer, task_instruction
from selfrag.scoring import (
    MISSING_LOGPROB,
    aggregate_closed,
    best_open,
    retrieval_probability,
    score_candidate,
    should_retrieve,
)
from selfrag.types import Candidate, Passage, Result, Scores
from selfrag.vocab import ReflectionVocab

L = math.log
# A made-up vocab (ids are arbitrary; real ids always come from a tokenizer).
V = ReflectionVocab(retrieval=101, no_retrieval=100, continue_evidence=102, relevant=104, irrelevant=103,
                    fully=112, partially=113, no_support=114, utility=[107, 108, 109, 110, 111],
                    paragraph_open=105, paragraph_close=106, pad=115, eos=2)
U1, U2, U3, U4, U5 = V.utility
A, B, C = 10, 11, 12            # ordinary tokens


def lp(**probs):
    """A step dict from probabilities keyed by attribute-ish names."""
    ids = {"rel": V.relevant, "irr": V.irrelevant, "full": V.fully, "part": V.partially, "nosup": V.no_support,
           "ret": V.retrieval, "noret": V.no_retrieval, "u1": U1, "u2": U2, "u3": U3, "u4": U4, "u5": U5,
           "a": A, "b": B, "c": C, "eos": V.eos}
    return {ids[k]: Logprob(L(p)) for k, p in probs.items()}


# ----------------------------------------------------------------- formulas
def test_relevance_at_first_position():
    # 0.6 / (0.6 + 0.2) = 0.75; the second step's table must not matter.
    s = score_candidate([A, V.eos], [lp(rel=0.6, irr=0.2, a=0.2), lp(rel=0.01, irr=0.9, eos=0.09)], L(0.5),
                        V, use_seqscore=False)
    assert s.rel == pytest.approx(0.75, abs=1e-12)


def test_plain_float_logprobs_accepted():
    step = {V.relevant: L(0.3), V.irrelevant: L(0.1)}     # vLLM-0.2 style: floats, not Logprob
    s = score_candidate([A], [step], 0.0, V)
    assert s.rel == pytest.approx(0.75, abs=1e-12)


def test_missing_token_counts_as_minus_100():
    # rel log-prob -100 + log 3, irr missing (-> -100): 3e^-100 / (3e^-100 + e^-100) = 0.75.
    step = {V.relevant: Logprob(MISSING_LOGPROB + L(3))}
    assert score_candidate([A], [step], 0.0, V).rel == pytest.approx(0.75, abs=1e-12)
    # Both missing: e^-100 / (2 e^-100) = 0.5.
    assert score_candidate([A], [{}], 0.0, V).rel == pytest.approx(0.5, abs=1e-12)
    assert MISSING_LOGPROB == -100.0


def test_support_at_first_generated_support_token_not_position_0():
    ids = [A, B, V.fully, C, V.no_support, V.eos]
    steps = [
        lp(rel=0.5, irr=0.5, full=0.1, part=0.1, nosup=0.8),   # would give 0.15: must be ignored
        lp(b=1.0),
        lp(full=0.5, part=0.3, nosup=0.2),                      # (0.5 + 0.5*0.3) / 1.0 = 0.65
        lp(c=1.0),
        lp(full=0.0001, part=0.0001, nosup=0.9998),            # second support token: ignored
        lp(eos=1.0),
    ]
    s = score_candidate(ids, steps, 0.0, V)
    assert s.sup == pytest.approx(0.65, abs=1e-12)


def test_support_ratio_is_renormalised():
    # (0.2 + 0.5*0.2) / (0.2 + 0.2 + 0.1) = 0.3 / 0.5 = 0.6
    s = score_candidate([V.partially], [lp(full=0.2, part=0.2, nosup=0.1)], 0.0, V)
    assert s.sup == pytest.approx(0.6, abs=1e-12)


def test_no_support_token_gives_zero_even_if_probable():
    # Support tokens are likely at step 0, but none is GENERATED -> 0.
    s = score_candidate([A, B], [lp(full=0.9, a=0.1), lp(b=1.0)], 0.0, V)
    assert s.sup == 0.0


def test_utility_weights():
    # -1*0.1 - 0.5*0.1 + 0*0.2 + 0.5*0.2 + 1*0.4 = 0.35 (sum of p = 1)
    ids = [A, B, C, U5, V.eos]
    steps = [lp(a=1.0), lp(b=1.0), lp(c=1.0), lp(u1=0.1, u2=0.1, u3=0.2, u4=0.2, u5=0.4), lp(eos=1.0)]
    assert score_candidate(ids, steps, 0.0, V).use == pytest.approx(0.35, abs=1e-12)


def test_utility_renormalised_and_missing():
    # U1..U3 missing (e^-100 each, negligible): (0.5*0.25 + 1*0.25) / 0.5 = 0.75
    s = score_candidate([U4], [lp(u4=0.25, u5=0.25)], 0.0, V)
    assert s.use == pytest.approx(0.75, abs=1e-12)
    # Only [Utility:1] present: -1.
    assert score_candidate([U1], [lp(u1=0.5)], 0.0, V).use == pytest.approx(-1.0, abs=1e-12)


def test_utility_first_generated_only():
    ids = [U1, U5]
    steps = [lp(u1=0.5, u3=0.5), lp(u5=1.0)]          # first: (-1*0.5 + 0) / 1 = -0.5
    assert score_candidate(ids, steps, 0.0, V).use == pytest.approx(-0.5, abs=1e-12)


def test_no_utility_token_gives_zero():
    s = score_candidate([A, V.fully], [lp(u5=0.9, a=0.1), lp(full=1.0)], 0.0, V)
    assert s.use == 0.0


def test_sequence_score_and_final():
    # 4 tokens, cumulative -2 -> seq = e^-0.5.  rel 0.75, sup 0.65, use 0.35.
    ids = [A, V.fully, U5, V.eos]
    steps = [lp(rel=0.6, irr=0.2, a=0.2), lp(full=0.5, part=0.3, nosup=0.2),
             lp(u1=0.1, u2=0.1, u3=0.2, u4=0.2, u5=0.4), lp(eos=1.0)]
    s = score_candidate(ids, steps, -2.0, V)
    seq = math.exp(-0.5)
    assert s.seq == pytest.approx(seq, abs=1e-12)
    assert (s.rel, s.sup, s.use) == pytest.approx((0.75, 0.65, 0.35), abs=1e-12)
    assert s.final == pytest.approx(seq + 0.75 + 0.65 + 0.5 * 0.35, abs=1e-12)
    s2 = score_candidate(ids, steps, -2.0, V, w_rel=2.0, w_sup=0.0, w_use=1.0, use_seqscore=False)
    assert s2.final == pytest.approx(2 * 0.75 + 0.35, abs=1e-12)


def test_empty_generation():
    # No tokens: seq = exp(0 / max(0, 1)) = 1; rel from an empty table = 0.5; sup = use = 0.
    s = score_candidate([], [], 0.0, V)
    assert (s.rel, s.sup, s.use, s.seq) == (0.5, 0.0, 0.0, 1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="logprob_token_ids"):
        score_candidate([A], None, 0.0, V)
    with pytest.raises(ValueError, match="1 token ids but 2"):
        score_candidate([A], [{}, {}], 0.0, V)
    with pytest.raises(ValueError, match="invalid log-prob"):
        score_candidate([A], [{V.relevant: float("nan")}], 0.0, V)


def _naive_ratio(lps):
    e = [math.exp(x) for x in lps]
    return [x / sum(e) for x in e]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-30, 0), min_size=5, max_size=5), st.floats(-30, 0), st.floats(-30, 0))
def test_property_ranges_and_exp_divide(u, r, i):
    steps = [{V.relevant: r, V.irrelevant: i, **dict(zip(V.utility, u))}]
    s = score_candidate([U3], steps, -1.0, V)
    assert s.rel == pytest.approx(_naive_ratio([r, i])[0], rel=1e-9, abs=1e-12)
    assert s.use == pytest.approx(sum(w * p for w, p in zip((-1, -0.5, 0, 0.5, 1), _naive_ratio(u))), abs=1e-9)
    assert 0 <= s.rel <= 1 and -1 <= s.use <= 1


# ---------------------------------------------------------------- retrieval
def test_paper_vs_reference_rule():
    # lp(Ret) = log 1/2, lp(NoRet) = log 1/4.
    step = lp(ret=0.5, noret=0.25)
    # paper: 0.5 / 0.75 = 2/3.  reference: ln2 / (ln2 + 2 ln2) = 1/3.
    assert retrieval_probability(step, V, "paper") == pytest.approx(2 / 3, abs=1e-12)
    assert retrieval_probability(step, V, "reference") == pytest.approx(1 / 3, abs=1e-12)
    # lp(Ret) = -3, lp(NoRet) = -1: reference 3/4 (retrieve at 0.2), paper 1/(1+e^2) ~ 0.119 (don't).
    step2 = {V.retrieval: Logprob(-3.0), V.no_retrieval: Logprob(-1.0)}
    ref, pap = retrieval_probability(step2, V, "reference"), retrieval_probability(step2, V, "paper")
    assert ref == pytest.approx(0.75, abs=1e-12)
    assert pap == pytest.approx(1 / (1 + math.e ** 2), abs=1e-12)
    assert should_retrieve(ref, 0.2) and not should_retrieve(pap, 0.2)
    # The inversion: model sure about retrieving (0.9 vs 0.01).  reference = 0.10536/(0.10536+4.60517)
    # = 0.02237 -> no retrieval; paper = 0.9/0.91 = 0.98901.
    step3 = lp(ret=0.9, noret=0.01)
    assert retrieval_probability(step3, V, "reference") == pytest.approx(0.022367, abs=1e-6)
    assert retrieval_probability(step3, V, "paper") == pytest.approx(0.9 / 0.91, abs=1e-12)


def test_retrieval_rule_missing_and_limits():
    # Both missing: paper 0.5; reference -100 / -200 = 0.5.  Ret missing only, NoRet = -1:
    # reference 100/101, paper e^-100/(e^-100 + e^-1) ~ 0.
    assert retrieval_probability({}, V, "paper") == pytest.approx(0.5)
    assert retrieval_probability({}, V, "reference") == pytest.approx(0.5)
    step = {V.no_retrieval: Logprob(-1.0)}
    assert retrieval_probability(step, V, "reference") == pytest.approx(100 / 101, abs=1e-12)
    assert retrieval_probability(step, V, "paper") < 1e-40
    assert retrieval_probability({V.retrieval: -math.inf, V.no_retrieval: -1.0}, V, "reference") == 1.0
    assert retrieval_probability({V.retrieval: -1.0, V.no_retrieval: -math.inf}, V, "reference") == 0.0
    with pytest.raises(ValueError, match="rule"):
        retrieval_probability({}, V, "adaptive")


def test_should_retrieve_strict_and_validated():
    assert should_retrieve(0.21, 0.2) and not should_retrieve(0.2, 0.2)
    with pytest.raises(ValueError, match="threshold"):
        should_retrieve(0.5, None)
    with pytest.raises(ValueError, match="prob"):
        should_retrieve(float("nan"), 0.2)


# -------------------------------------------------------------- aggregation
def cand(text, final, title="t"):
    return Candidate(Passage(title, "x"), text, [], Scores(0.0, 0.0, 0.0, 0.0, final))


def test_closed_aggregation_two_passages_agree():
    cands = [cand("true[Fully supported][Utility:5]</s>", 1.2), cand("false", 1.5), cand("true", 1.0)]
    # true: 1.2 + 1.0 = 2.2 > false 1.5, although false is the single best candidate.
    assert aggregate_closed(cands, "fever") == "true"
    assert best_open(cands).text == "false"


def test_closed_aggregation_merges_leading_hash_and_ties_first_seen():
    # "#B" post-processes to "B": B = 0.5 + 0.6 = 1.1 > A 1.0.
    assert aggregate_closed([cand("A", 1.0), cand("#B", 0.5), cand("B\n", 0.6)], "arc_c") == "B"
    # Tie 1.0 vs 1.0: the first-seen answer wins (the released stable sort).
    assert aggregate_closed([cand("false", 1.0), cand("true", 1.0)], "pubhealth") == "false"
    assert aggregate_closed([cand("true", 1.0), cand("false", 1.0)], "fever") == "true"


def test_best_open_ties_first_and_errors():
    a, b = cand("x", 2.0, "p1"), cand("y", 2.0, "p2")
    assert best_open([cand("z", 1.0), a, b]) is a
    with pytest.raises(ValueError):
        best_open([])
    with pytest.raises(ValueError, match="closed"):
        aggregate_closed([a], "popqa")
    with pytest.raises(ValueError, match="NaN"):
        best_open([cand("n", float("nan"))])


# -------------------------------------------------------------------- types
def test_result_to_dict_json_roundtrip():
    np = pytest.importorskip("numpy")
    r = Result(
        answer="Paris", retrieved=True, retrieval_prob=np.float64(0.75),
        candidates=[Candidate(Passage("Paris", "Capital.", 1.5), "Paris", [5, 2],
                              Scores(0.75, float("nan"), float("inf"), np.float32(0.5), 1.25)),
                    Candidate(None, "Lyon", [7], Scores(0.5, 0.0, 0.0, 1.0, 1.5))],
        tree=[{"score": float("-inf"), "children": [Scores(1.0, 0.0, 0.0, 1.0, 2.0)]}],
    )
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back == d
    assert back["retrieval_prob"] == 0.75 and type(d["retrieval_prob"]) is float
    s = back["candidates"][0]["scores"]
    assert s == {"rel": 0.75, "sup": None, "use": None, "seq": 0.5, "final": 1.25}
    assert back["candidates"][1]["passage"] is None
    assert back["tree"] == [{"score": None, "children": [{"rel": 1.0, "sup": 0.0, "use": 0.0, "seq": 1.0,
                                                          "final": 2.0}]}]
    assert Result.from_dict(back).to_dict() == d


def test_passage_from_dict():
    p = Passage.from_dict({"id": "17", "title": "Paris", "text": "Capital of France.", "score": "1.23",
                           "hasanswer": True})
    assert p == Passage("Paris", "Capital of France.", 1.23)
    assert Passage.from_dict({"title": "T", "text": "x"}).score is None
    assert Passage.from_dict({"title": "T", "text": "x", "score": 2}).score == 2.0
    assert Passage.from_dict({"text": "x"}).title == ""
    with pytest.raises(ValueError, match="text"):
        Passage.from_dict({"title": "T"})
    with pytest.raises(ValueError, match="score"):
        Passage.from_dict({"title": "T", "text": "x", "score": "high"})
    with pytest.raises(ValueError):
        Passage.from_dict(["T", "x"])


# ------------------------------------------------------------------ prompts
def test_format_prompt():
    # retrieval_lm/utils.py PROMPT_DICT["prompt_no_input"] / ["prompt_input"]
    assert format_prompt("Who wrote Hamlet?") == "### Instruction:\nWho wrote Hamlet?\n\n### Response:\n"
    assert format_prompt("Summarise.", "Some text") == \
        "### Instruction:\nSummarise.\n\n### Input:\nSome text\n\n### Response:\n"
    with pytest.raises(ValueError):
        format_prompt(None)


def test_task_instructions():
    # run_short_form.py preprocess_input_data + utils.py TASK_INST["fever"]
    fever = ("Is the following statement correct or not? Say true if it's correct; otherwise say false."
             "\n\n## Input:\n\nVitamin C cures colds.")
    assert task_instruction("fever", "Vitamin C cures colds.") == fever
    assert task_instruction("pubhealth", "Vitamin C cures colds.") == fever
    # PopQA / TriviaQA: the released commands pass no --task, so the instruction is the question.
    assert task_instruction("popqa", "What is Henry Feilden's occupation?") == "What is Henry Feilden's occupation?"
    assert task_instruction(None, "Q?") == task_instruction("triviaqa", "Q?") == "Q?"
    # run_long_form_static.py: instructions + "## Input:\n\n" + question (no separator, verbatim)
    assert task_instruction("asqa", "Who won?") == (
        "Answer the following question. The question may be ambiguous and have multiple correct answers, "
        "and in that case, you have to provide a long-form answer including all correct answers."
        "## Input:\n\nWho won?")
    with pytest.raises(ValueError, match="unknown task"):
        task_instruction("squad", "Q?")


def test_arc_choices():
    # run_short_form.py preprocess_input_data (arc_c): labels "1"-"4" shown as A-D.
    inst = "Given four answer candidates, A, B, C and D, choose the best answer choice."
    q = "Which is a gas?"
    got = task_instruction("arc_c", q, {"text": ["rock", "air", "wood", "iron"], "label": ["1", "2", "3", "4"]})
    assert got == inst + "\n\n### Input:\nWhich is a gas?\nA: rock\nB: air\nC: wood\nD: iron"
    # Three choices: "D: " stays, empty.  Five lettered choices: E is dropped, as released.
    assert task_instruction("arc_c", q, {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}) == \
        inst + "\n\n### Input:\nWhich is a gas?\nA: x\nB: y\nC: z\nD: "
    five = {"text": ["p", "q", "r", "s", "t"], "label": ["A", "B", "C", "D", "E"]}
    assert task_instruction("arc_c", q, five).endswith("\nA: p\nB: q\nC: r\nD: s")
    with pytest.raises(ValueError, match="choices"):
        task_instruction("arc_c", q)
    with pytest.raises(ValueError, match="lack"):
        task_instruction("arc_c", q, {"text": ["x", "y"], "label": ["1", "2"]})


def test_format_passage():
    # run_short_form.py: prompt + "[Retrieval]<paragraph>{0}\n{1}</paragraph>".format(title, text)
    assert format_passage(Passage("Paris", "Paris is the capital.")) == \
        "[Retrieval]<paragraph>Paris\nParis is the capital.</paragraph>"


def test_postprocess_answer():
    assert postprocess_answer("[Relevant]#true[Fully supported][Utility:5]</s>") == "true"
    assert postprocess_answer("Paris\nis big") == "Parisis big"      # newlines removed, not replaced
    assert postprocess_answer("::x") == ":x"                          # only one leading char dropped
    assert postprocess_answer(" #x") == " #x"                         # only a LEADING # / :
    assert postprocess_answer("[Continue to Use Evidence]B<paragraph>") == "B"
    assert postprocess_answer("") == ""                               # released: IndexError


def test_normalize_closed_answer():
    assert normalize_closed_answer("SUPPORTS", "fever") == "true"
    assert normalize_closed_answer("It REFUTES it", "pubhealth") == "false"
    assert normalize_closed_answer("SUPPORTS REFUTES", "fever") == "true"   # SUPPORTS checked first
    assert normalize_closed_answer("false", "fever") == "false"
    assert normalize_closed_answer("SUPPORTS", "arc_c") == "SUPPORTS"


# -------------------------------------------------------------------- vocab
@pytest.fixture(scope="module")
def model_dir():
    return random_model_dir()


def test_vocab_from_default_tokenizer(model_dir):
    tok = Tokenizer.from_pretrained(model_dir)
    v = ReflectionVocab.from_tokenizer(tok)
    # Independent source: the checkpoint's added_tokens.json.
    added = json.loads((Path(model_dir) / "added_tokens.json").read_text())
    assert v.retrieval == added["[Retrieval]"] and v.no_retrieval == added["[No Retrieval]"]
    assert v.continue_evidence == added["[Continue to Use Evidence]"]
    assert (v.relevant, v.irrelevant) == (added["[Relevant]"], added["[Irrelevant]"])
    assert (v.fully, v.partially, v.no_support) == (
        added["[Fully supported]"], added["[Partially supported]"], added["[No support / Contradictory]"])
    assert v.utility == [added[f"[Utility:{k}]"] for k in range(1, 6)]
    assert (v.paragraph_open, v.paragraph_close, v.pad) == (added["<paragraph>"], added["</paragraph>"],
                                                            added["<pad>"])
    assert v.eos == tok.eos_token_id
    assert v.reflection_ids == [added[t] for t in T.ADDITIONAL_SPECIAL_TOKENS]
    assert len(set(v.reflection_ids)) == 15
    assert v.scored_ids == sorted([v.retrieval, v.no_retrieval, v.relevant, v.irrelevant, v.fully,
                                   v.partially, v.no_support, *v.utility])
    assert v.support_group == [v.fully, v.partially, v.no_support]
    assert v.relevance_group == [v.irrelevant, v.relevant]
    assert v.retrieval_group == [v.no_retrieval, v.retrieval, v.continue_evidence]


def test_vocab_error_for_plain_llama_tokenizer(model_dir):
    plain = Tokenizer(Path(model_dir) / "tokenizer.model")     # no added tokens at all
    with pytest.raises(ValueError, match=r"lacks the Self-RAG token\(s\) '\[No Retrieval\]'.*'<pad>'"):
        ReflectionVocab.from_tokenizer(plain)
    base = plain.vocab_size
    partial = Tokenizer(Path(model_dir) / "tokenizer.model",
                        [AddedToken(t, base + i) for i, t in enumerate(T.ADDED_TOKENS) if t != "[Utility:3]"])
    with pytest.raises(ValueError) as e:
        ReflectionVocab.from_tokenizer(partial)
    assert "'[Utility:3]'" in str(e.value) and "'[Utility:2]'" not in str(e.value)
