"""SamplingParams(prompt_logprobs=N) and LLM.score (engine/sampling/prompt_logprobs.py,
engine/sampling/continuation_logprobs.py) against HF transformers' log-softmax of one forward pass, on every
parity checkpoint; prefix-cached prompts, extended turns, n samples and bad calls."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.errors import InvalidRequestError
from tests.helpers import finish_all, hf_model, make_checkpoint, make_llm, token_prompts
from tests.test_engine_parity import VARIANTS

TOL = 2e-4


@torch.no_grad()
def hf_logprobs(hf, ids) -> torch.Tensor:
    """[len, V]: row j is HF's log-softmax at position j (predicting token j + 1)."""
    return torch.log_softmax(hf(torch.tensor([ids], device=hf.device)).logits[0].float(), -1).cpu()


def check_entries(entries, ids, ref, top_n, start=1):
    """entries[j] (j >= start) holds token ids[j] and the top-N of ref[j - 1], with the
    log-probs and ranks (1 + tokens with a larger log-prob) of HF's row."""
    assert all(e is None for e in entries[:start]) and len(entries) == len(ids)
    for j in range(start, len(ids)):
        row, e = ref[j - 1], entries[j]
        want = {ids[j], *row.topk(top_n).indices.tolist()} if top_n else {ids[j]}
        assert set(e) == want, j
        for t, lp in e.items():
            assert lp.logprob == pytest.approx(float(row[t]), abs=TOL)
            # rank: 1 + tokens with a larger log-prob (a tie within TOL may go either way)
            assert int((row > row[t] + TOL).sum()) + 1 <= lp.rank <= int((row > row[t] - TOL).sum()) + 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prompt_logprobs_and_score_equal_hf_on_every_parity_checkpoint(tmp_path, variant):
    kw = dict(VARIANTS[variant])
    cfg = make_checkpoint(tmp_path, **kw)
    hf = hf_model(tmp_path)
    llm = make_llm(str(tmp_path), show_progress=False, block_size=8)
    prompts = token_prompts(3, cfg.vocab_size, seed=len(variant), min_len=5, max_len=40)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=0, prompt_logprobs=3), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == []
        check_entries(out.prompt_logprobs, p, hf_logprobs(hf, p), 3)
    # score: the prompt is the first 4 tokens, the continuations the rest of each prompt
    head = prompts[0][:4]
    conts = [prompts[0][4:], prompts[1][1:9], [7]]
    ref = [[float(hf_logprobs(hf, head + c)[len(head) + j - 1, t]) for j, t in enumerate(c)] for c in conts]
    got = llm.score({"prompt_token_ids": head}, conts, per_token=True)
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, abs=TOL)
    assert llm.score({"prompt_token_ids": head}, conts) == pytest.approx([sum(r) for r in ref], abs=5 * TOL)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("plp")
    cfg = make_checkpoint(path, num_key_value_heads=2, std=0.3)
    return str(path), cfg, hf_model(path)


def test_cached_prompts_are_recomputed_and_generation_is_unchanged(ckpt):
    path, cfg, hf = ckpt
    llm = make_llm(path, show_progress=False, block_size=4)
    p = token_prompts(1, cfg.vocab_size, seed=3, min_len=30, max_len=30)[0]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": p}], greedy, use_tqdm=False)[0]
    hits = llm.block_manager.get_stats()["prefix_cache_hit_tokens"]
    out = llm.generate([{"prompt_token_ids": p}],
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert llm.block_manager.get_stats()["prefix_cache_hit_tokens"] == hits     # nothing reused
    check_entries(out.prompt_logprobs, p, hf_logprobs(hf, p), 1)
    assert out.outputs[0].token_ids == first.outputs[0].token_ids


def test_extended_turns_and_n_samples_carry_prompt_logprobs(ckpt):
    path, cfg, hf = ckpt
    llm = make_llm(path, show_progress=False, block_size=4)
    p = token_prompts(1, cfg.vocab_size, seed=4, min_len=13, max_len=13)[0]
    rid = llm.add_request({"prompt_token_ids": p},
                          SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, hold=True))
    first = finish_all(llm)[rid].outputs[0]
    ext = [5, 6, 7, 8, 9]
    llm.extend(rid, ext, SamplingParams(max_tokens=0, prompt_logprobs=0))
    out = finish_all(llm)[rid]
    ctx = p + first.token_ids + ext
    check_entries(out.prompt_logprobs, ctx, hf_logprobs(hf, ctx), 0, start=len(p) + 2)
    outs = llm.generate([{"prompt_token_ids": p}],
                        SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=3, prompt_logprobs=0),
                        use_tqdm=False)[0]
    assert len(outs.outputs) == 3
    check_entries(outs.prompt_logprobs, p, hf_logprobs(hf, p), 0)


def test_score_shares_the_prompt_and_refuses_bad_input(ckpt):
    path, cfg, hf = ckpt
    for caching in (True, False):
        llm = make_llm(path, show_progress=False, block_size=4, enable_prefix_caching=caching)
        p = token_prompts(1, cfg.vocab_size, seed=5, min_len=50, max_len=50)[0]
        conts = [[3, 4, 5], [9] * 7, [11, 12]]
        llm.score({"prompt_token_ids": p}, conts)
        assert llm.scheduler.num_prefill_tokens == 49 + sum(1 + len(c) for c in conts)
        assert llm.block_manager.get_stats()["used"] == 0
    one = llm.score({"prompt_token_ids": [1]}, [[5, 6]], per_token=True)[0]
    ref = hf_logprobs(hf, [1, 5, 6])
    assert one == pytest.approx([float(ref[0, 5]), float(ref[1, 6])], abs=TOL)
    assert llm.score({"prompt_token_ids": p}, []) == []
    for conts, match in (([[]], "empty"), ([[cfg.vocab_size]], "outside"), ([[5] * 600], "max_model_len"),
                         ("abc", "list"), ([3.5], "continuation 0")):
        with pytest.raises(InvalidRequestError, match=match):
            llm.score({"prompt_token_ids": p}, conts)
    assert not llm.has_unfinished_requests()
