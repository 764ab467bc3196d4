"""LLM.beam_search (engine/sampling/beam_search.py) against HF transformers'
``generate(num_beams=w, do_sample=False, early_stopping=True, length_penalty=...,
num_return_sequences=w)``: the same sequences, best first, and the same scores
(``sequences_scores``), for widths 1-4, several lengths and length penalties, on
checkpoints whose EOS is a token the model often picks, so that EOS ends some beams early."""
from __future__ import annotations

import collections

import pytest
import torch

from engine import BeamSearchParams
from engine.errors import InvalidRequestError
from tests.helpers import hf_model, make_checkpoint, make_llm, token_prompts
from tests.test_engine_parity import VARIANTS


def frequent_token(path, cfg, prompts) -> int:
    """A token the model's greedy continuations use often (not BOS): made the EOS, it
    ends beams early."""
    llm = make_llm(path, show_progress=False)
    from engine import SamplingParams
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    counts = collections.Counter(t for o in outs for t in o.outputs[0].token_ids if t != 1)
    return counts.most_common(1)[0][0]


def hf_beams(hf, prompt, w, new, lp, eos):
    g = hf.generate(torch.tensor([prompt], device=hf.device), num_beams=w, do_sample=False, early_stopping=True,
                    length_penalty=lp, num_return_sequences=w, max_new_tokens=new, eos_token_id=eos,
                    pad_token_id=eos, return_dict_in_generate=True, output_scores=True)
    seqs = []
    for s in g.sequences.tolist():
        gen = s[len(prompt):]
        if eos in gen:
            gen = gen[:gen.index(eos) + 1]          # HF pads after EOS
        seqs.append(prompt + gen)
    scores = g.sequences_scores.tolist() if w > 1 else None
    return seqs, scores


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_beam_search_equals_hf(tmp_path, variant):
    base = tmp_path / "base"
    cfg = make_checkpoint(base, std=0.3, **VARIANTS[variant])
    prompts = token_prompts(3, cfg.vocab_size, seed=len(variant), min_len=4, max_len=20)
    eos = frequent_token(str(base), cfg, prompts)
    path = tmp_path / "eos"
    make_checkpoint(path, std=0.3, eos_token_id=eos, **VARIANTS[variant])     # same weights, that EOS
    hf = hf_model(path)
    llm = make_llm(str(path), show_progress=False, block_size=4)
    early = 0
    for w in (1, 2, 3, 4):
        for new, lp in ((6, 1.0), (12, 0.6)) if w != 3 else ((12, 1.3),):
            outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                                   BeamSearchParams(beam_width=w, max_tokens=new, length_penalty=lp))
            for p, out in zip(prompts, outs):
                ref, scores = hf_beams(hf, p, w, new, lp, eos)
                assert [s.tokens for s in out.sequences] == ref, (w, new, lp)
                if scores is not None:
                    assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)
                for s in out.sequences:
                    n = len(s.tokens) - len(p)
                    assert s.score == pytest.approx(s.cum_logprob / n ** lp, abs=1e-5)
                    assert len(s.logprobs) == n
                    assert s.finish_reason == ("stop" if s.tokens[-1] == eos else "length")
                early += sum(s.finish_reason == "stop" and len(s.tokens) - len(p) < new for s in out.sequences)
    assert early > 0                                   # EOS did end beams early
    assert llm.block_manager.get_stats()["used"] == 0 and not llm.has_unfinished_requests()


def test_beams_share_kv_and_run_in_one_step(tmp_path):
    """Width 4, 64 new tokens: at most 4 new blocks per 16 generated tokens per prompt
    beyond the prompt's own, every beam of both prompts in one engine step, and no
    prompt prefilled twice."""
    cfg = make_checkpoint(tmp_path, std=0.3, num_key_value_heads=2, max_position_embeddings=512)
    llm = make_llm(str(tmp_path), show_progress=False, block_size=16)
    prompts = [[1] + torch.randint(3, cfg.vocab_size, (n - 1,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (64, 100)]
    peak, steps, real_step = [0], [], llm.core.step

    def step(finished_only):                           # beam search steps through the core's step
        outs = real_step(finished_only)
        peak[0] = max(peak[0], llm.block_manager.get_stats()["used"])
        steps.append(len(outs))
        return outs
    llm.core.step = step
    new = 64
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                           BeamSearchParams(beam_width=4, max_tokens=new, ignore_eos=True))
    assert all(len(o.sequences) == 4 for o in outs)
    prompt_blocks = sum(-(-len(p) // 16) for p in prompts)
    assert peak[0] <= prompt_blocks + 2 * 4 * (new // 16)    # the target, partial blocks included
    assert max(steps) == 8                              # 2 prompts x 4 beams advanced together
    # one prefill of each prompt, then one position per beam per step
    assert llm.scheduler.num_prefill_tokens == sum(map(len, prompts)) + 2 * 4 * (new - 1)


def test_bad_params():
    for kw, match in ((dict(beam_width=0, max_tokens=4), "beam_width"),
                      (dict(beam_width=2, max_tokens=0), "max_tokens"),
                      (dict(beam_width=2, max_tokens=4, temperature=0.7), "temperature")):
        with pytest.raises(InvalidRequestError, match=match):
            BeamSearchParams(**kw)
