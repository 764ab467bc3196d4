"""SelfRAG short- and long-form on the embedded default model (random weights, CPU fp32).

The reference test re-implements the released run_short_form.py logic on plain
transformers (its own tokenizer, greedy loop and formulas, written out here) and
requires identical tokens, decision and scores.
"""
import math

import pytest
import torch

from engine import LLM
from selfrag import Passage, SelfRAG
from selfrag.default_model import random_model_dir

QUESTION = "Can you tell me the difference between llamas and alpacas?"
PASSAGES = [
    Passage("Alpaca", "The alpaca is a species of South American camelid mammal."),
    Passage("Llama", "Llamas are used as pack animals by Andean cultures."),
    Passage("Fiber", "Alpacas were bred specifically for their fiber."),
]


@pytest.fixture(scope="module")
def model_dir():
    return random_model_dir()


def make(model_dir, **kw):
    return SelfRAG(LLM(model_dir, dtype="float32", device="cpu", show_progress=False, **kw))


# ----------------------------------------------------------------- released logic on HF
def _released_short_form(model_dir, question, passages, max_tokens, threshold=0.2, w_use=1.0):
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tid = tok.convert_tokens_to_ids
    prompt = "### Instruction:\n{0}\n\n### Response:\n".format(question)

    @torch.no_grad()
    def greedy(text):
        ids = torch.tensor([tok(text)["input_ids"]])
        out, rows = [], []
        for _ in range(max_tokens):
            lp = torch.log_softmax(hf(ids).logits[0, -1].float(), -1)
            nxt = int(lp.argmax())
            rows.append(lp)
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            if nxt == tok.eos_token_id:
                break
        return out, rows

    with torch.no_grad():
        first = torch.log_softmax(hf(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1], -1)
    ret, no_ret = float(first[tid("[Retrieval]")]), float(first[tid("[No Retrieval]")])
    retrieve = ret / (ret + no_ret) > threshold          # the released ratio of LOG-probs
    if not retrieve:
        return retrieve, []
    results = []
    for p in passages:
        ids, rows = greedy(prompt + "[Retrieval]<paragraph>{0}\n{1}</paragraph>".format(p.title, p.text))
        seq = sum(float(r[t]) for r, t in zip(rows, ids)) / max(len(ids), 1)
        prob = lambda i, name: math.exp(float(rows[i][tid(name)]))   # noqa: E731
        rel = prob(0, "[Relevant]") / (prob(0, "[Relevant]") + prob(0, "[Irrelevant]"))
        grd = ["[Fully supported]", "[Partially supported]", "[No support / Contradictory]"]
        sup = 0.0
        at = [i for i, t in enumerate(ids) if t in [tid(g) for g in grd]]
        if at:
            s = sum(prob(at[0], g) for g in grd)
            sup = prob(at[0], grd[0]) / s + 0.5 * prob(at[0], grd[1]) / s
        ut = [f"[Utility:{i}]" for i in range(1, 6)]
        use = 0.0
        at = [i for i, t in enumerate(ids) if t in [tid(u) for u in ut]]
        if at:
            s = sum(prob(at[0], u) for u in ut)
            use = sum(w * prob(at[0], u) / s for w, u in zip([-1, -0.5, 0, 0.5, 1], ut))
        results.append((ids, dict(rel=rel, sup=sup, use=use, seq=math.exp(seq),
                                  final=math.exp(seq) + rel + sup + w_use * use)))
    return retrieve, results


def test_reference_mode_equals_released_logic_on_hf(model_dir):
    rag = make(model_dir)
    got = rag.answer(QUESTION, passages=PASSAGES, mode="adaptive", rule="reference",
                     constrained=False, w_use=1.0, max_tokens=16)
    retrieve, ref = _released_short_form(model_dir, QUESTION, PASSAGES, 16)
    assert got.retrieved == retrieve is True
    assert len(got.candidates) == len(ref)
    for cand, (ids, scores) in zip(got.candidates, ref):
        assert cand.token_ids == ids
        for k, v in scores.items():
            assert getattr(cand.scores, k) == pytest.approx(v, rel=1e-4, abs=1e-5), k
    best = max(range(len(ref)), key=lambda i: ref[i][1]["final"])
    assert got.candidates[best].scores.final == max(c.scores.final for c in got.candidates)


def _track_peak_blocks(rag) -> dict:
    """Wraps ``rag.llm.step`` to record the most KV blocks in use after any step."""
    peak, real_step = {"used": 0}, rag.llm.step

    def step():
        out = real_step()
        peak["used"] = max(peak["used"], rag.llm.block_manager.get_stats()["used"])
        return out

    rag.llm.step = step
    return peak


def _prompt_ids(rag):
    from selfrag.prompts import format_prompt, task_instruction
    return rag._encode(format_prompt(task_instruction(None, QUESTION, None)))


def test_branches_extend_one_held_prompt_and_equal_solo_runs(model_dir):
    """The prompt is prefilled once and held; each passage branch extends a copy of it,
    so only the passages are prefilled, with prefix caching on or off; the branches
    give the tokens of solo runs."""
    from selfrag.prompts import format_passage, format_prompt, task_instruction
    results = []
    for caching in (True, False):
        rag = make(model_dir, block_size=8, enable_prefix_caching=caching)
        peak = _track_peak_blocks(rag)
        results.append(rag.answer(QUESTION, passages=PASSAGES, mode="always", max_tokens=12))
        prompt = _prompt_ids(rag)
        text = format_prompt(task_instruction(None, QUESTION, None))
        passages = [len(rag._encode(text + format_passage(p))) - len(prompt) for p in PASSAGES]
        assert rag.llm.scheduler.num_prefill_tokens == len(prompt) + sum(passages)
        # at most each branch's own blocks with the prompt's full blocks counted once
        own = sum(-(-(len(prompt) + n + 12) // 8) for n in passages)
        assert peak["used"] <= own - (len(PASSAGES) - 1) * (len(prompt) // 8)
        assert rag.llm.block_manager.get_stats()["used"] == 0          # nothing left held
    assert [c.token_ids for c in results[0].candidates] == [c.token_ids for c in results[1].candidates]
    for p, cand in zip(PASSAGES, results[0].candidates):
        solo = make(model_dir).answer(QUESTION, passages=[p], mode="always", max_tokens=12)
        assert solo.candidates[0].token_ids == cand.token_ids


def test_constrained_branches_follow_the_grammar(model_dir):
    rag = make(model_dir)
    v = rag.vocab
    res = rag.answer(QUESTION, passages=PASSAGES, mode="always", max_tokens=30)
    for c in res.candidates:
        assert c.token_ids[0] in (v.relevant, v.irrelevant)
        for a, b in zip(c.token_ids, c.token_ids[1:]):
            if a in v.utility:
                assert b == v.eos
        assert v.paragraph_open not in c.token_ids and v.paragraph_close not in c.token_ids
    never = rag.answer(QUESTION, mode="never", max_tokens=20)
    assert not never.retrieved and never.candidates[0].passage is None
    assert v.retrieval not in never.candidates[0].token_ids


def test_adaptive_paper_rule_uses_probabilities(model_dir):
    rag = make(model_dir)
    res = rag.answer(QUESTION, passages=PASSAGES, mode="adaptive", threshold=0.0, max_tokens=4)
    assert res.retrieved and 0.0 < res.retrieval_prob < 1.0
    res = rag.answer(QUESTION, passages=PASSAGES, mode="adaptive", threshold=1.0, max_tokens=4)
    assert not res.retrieved and len(res.candidates) == 1


def test_long_form_tree_obeys_the_algorithm_and_children_share_blocks(model_dir):
    rag = make(model_dir, block_size=8)
    res = rag.generate_long(QUESTION, passages=PASSAGES, beam_width=2, max_depth=3, segment_tokens=10)
    tree = res.tree
    by_parent = {}
    for n in tree[1:]:
        by_parent.setdefault(n["parent"], []).append(n)
    for parent, kids in by_parent.items():
        assert len(kids) == len(PASSAGES)                     # one child per passage
    for depth in {n["depth"] for n in tree[1:]}:
        kept = [n for n in tree if n["depth"] == depth and n["kept"]]
        assert len(kept) <= 2                                 # survivors = beam width
    assert max(n["depth"] for n in tree) <= 3
    # every expanded parent was a kept node of the previous depth
    for parent in by_parent:
        assert parent == 0 or tree[parent]["kept"]
    # product of segment finals along the path
    for n in tree[1:]:
        assert n["score"] == pytest.approx(tree[n["parent"]]["score"] * n["scores"]["final"])
    # every child extends a copy of its held beam: only its passage is prefilled (and,
    # after a segment that did not end in [Retrieval], that segment's last token)
    from selfrag.prompts import format_passage
    pids = [len(rag.tokenizer.encode(format_passage(p), add_special_tokens=False)) for p in PASSAGES]
    children = tree[1:]
    floor = len(_prompt_ids(rag)) + sum(pids[n["passage"]] for n in children)
    assert floor <= rag.llm.scheduler.num_prefill_tokens <= floor + len(children)
    assert rag.llm.block_manager.get_stats()["used"] == 0 and not rag.llm.has_unfinished_requests()
    assert isinstance(res.to_dict(), dict)


class _FlakyRetriever:
    """Raises for queries holding "broken"; otherwise returns the fixed passages."""

    def retrieve(self, query, k):
        if "broken" in query:
            raise ConnectionError("index server unreachable")
        return PASSAGES[:k]


def test_a_failing_retriever_fails_only_its_question(model_dir):
    rag = make(model_dir)
    rag.retriever = _FlakyRetriever()
    questions = [QUESTION, "a broken question", "What do alpacas eat?"]
    results = rag.answer_batch(questions, mode="always", k=2, max_tokens=8)
    bad = results[1]
    assert bad.error == "question 1: the retriever raised ConnectionError: index server unreachable"
    assert bad.answer == "" and bad.candidates == [] and bad.to_dict()["error"] == bad.error
    for q, r in zip([questions[0], questions[2]], [results[0], results[2]]):
        solo = make(model_dir).answer(q, passages=PASSAGES[:2], mode="always", max_tokens=8)
        assert r.error is None and r.answer == solo.answer
        assert [c.token_ids for c in r.candidates] == [c.token_ids for c in solo.candidates]
    assert not rag.llm.has_unfinished_requests()


def test_a_failing_engine_request_fails_only_its_question(model_dir, monkeypatch):
    """One question's branch fails in the engine (the grammar processor leaves NaN in its
    row; a processor that raises would fail every row of its batched call): that Result
    carries the engine's error, the other one is whole."""
    rag = make(model_dir)
    real = rag._params

    def params(*a, **k):
        sp, constraint = real(*a, **k)
        inner = sp.logits_processors[0]

        def failing(logits, ids, toks):
            out = inner(logits, ids, toks)
            for row, rid in enumerate(ids):
                if rid.endswith("-1"):                   # branch 1 belongs to question 1
                    out[row] = float("nan")
            return out
        sp.logits_processors = [failing]
        return sp, constraint
    monkeypatch.setattr(rag, "_params", params)
    results = rag.answer_batch([QUESTION, "What do alpacas eat?"], passages=[PASSAGES[:1], PASSAGES[:1]],
                               mode="always", max_tokens=8)
    assert results[0].error is None and results[0].candidates
    assert results[1].error.startswith("question 1: request ") and "NaN" in results[1].error
    solo = make(model_dir).answer(QUESTION, passages=PASSAGES[:1], mode="always", max_tokens=8)
    assert results[0].answer == solo.answer
