"""examples/: each runs as a script, stays within 100 lines of the public API, and gives
what an independent reference gives (separate requests, LLM.beam_search, HF's
log-softmax), sharing KV as it says it does (prefill counts)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from engine import LLM, BeamSearchParams, SamplingParams
from selfrag.default_model import default_model_dir

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
NAMES = ["best_of_n", "beam_search_custom_scorer", "multiple_choice", "reflection_tree_search"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def llm():
    return LLM(default_model_dir(), show_progress=False)


@pytest.mark.parametrize("name", NAMES)
def test_each_example_runs_as_a_script_on_the_public_api(name):
    path = os.path.join(EXAMPLES, name + ".py")
    code = open(path).read()
    assert len(code.splitlines()) <= 100          # "a page of code"
    assert "._" not in code.replace("__", "")     # no private attribute of the engine
    p = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(EXAMPLES), env={**os.environ, "PYTHONPATH": os.path.dirname(EXAMPLES)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()


def test_best_of_n_samples_equal_separate_seeded_requests(llm):
    ex = load("best_of_n")
    from selfrag.types import Passage
    got = ex.best_of_n(llm, "What is a llama?", Passage("", "Llamas are pack animals."), n=4, max_tokens=20)
    assert [g[0] for g in got] == sorted((g[0] for g in got), reverse=True)
    prompt = ex.format_prompt("What is a llama?") + ex.format_passage(Passage("", "Llamas are pack animals."))
    texts = {llm.generate([prompt], SamplingParams(seed=i, temperature=0.8, top_p=0.95, max_tokens=20,
                                                    skip_special_tokens=False), use_tqdm=False)[0].outputs[0].text
             for i in range(4)}
    assert {g[2] for g in got} == texts


def test_custom_beam_search_with_log_prob_scoring_equals_llm_beam_search(llm):
    ex = load("beam_search_custom_scorer")
    before = llm.scheduler.num_prefill_tokens
    got = ex.beam_search(llm, "The llama is", width=3, max_tokens=8)
    prompt_len = len(llm.get_tokenizer().encode("The llama is"))
    assert llm.scheduler.num_prefill_tokens - before == prompt_len + 3 * 7      # then one token per beam
    ref = llm.beam_search(["The llama is"], BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True,
                                                             length_penalty=0.0))[0]
    assert [t for _, t in got] == [s.tokens[prompt_len:] for s in ref.sequences]
    assert [s for s, _ in got] == pytest.approx([s.cum_logprob for s in ref.sequences], abs=1e-4)
    assert llm.block_manager.get_stats()["used"] == 0


def test_multiple_choice_equals_hf_log_softmax(llm):
    ex = load("multiple_choice")
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    question, choices = "Which animal was bred for its fiber?", ["The alpaca.", "The llama.", "A hat."]
    got = ex.rank_choices(llm, question, choices)
    tok = llm.get_tokenizer()
    prompt = tok.encode(ex.format_prompt(question) + "[No Retrieval]")
    ref = []
    for c in choices:
        ids = tok.encode(" " + c, add_special_tokens=False)
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([prompt + ids])).logits[0].float(), -1)
        ref.append((sum(float(lp[len(prompt) + j - 1, t]) for j, t in enumerate(ids)) / len(ids), c))
    ref.sort(key=lambda x: -x[0])
    assert [c for _, c in got] == [c for _, c in ref]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in ref], abs=1e-4)


def test_tree_search_prefills_each_text_once_and_ranks_its_branches(llm):
    ex = load("reflection_tree_search")
    from selfrag.prompts import format_passage, format_prompt
    from selfrag.types import Passage
    tok = llm.get_tokenizer()
    passages = [Passage("A", "Alpacas were bred for their fiber."), Passage("B", "Llamas carry loads.")]
    before = llm.scheduler.num_prefill_tokens
    got = ex.tree_search(llm, "What were alpacas bred for?", passages, keep=2)
    assert 1 <= len(got) <= 2 and [b["score"] for b in got] == sorted((b["score"] for b in got), reverse=True)
    text = len(tok.encode(format_prompt("What were alpacas bred for?")))
    text += sum(len(tok.encode(format_passage(p), add_special_tokens=False)) for p in passages)
    forced = llm.scheduler.num_prefill_tokens - before - text       # one per forced reflection token
    assert 2 * len(passages) <= forced <= 2 * len(passages) + 3 * 2
    for b in got:
        assert b["text"][0] in (ex.ReflectionVocab.from_tokenizer(tok).relevance_group)
    assert llm.block_manager.get_stats()["used"] == 0 and not llm.has_unfinished_requests()
