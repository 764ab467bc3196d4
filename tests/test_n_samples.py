"""SamplingParams(n=k) (engine/core/n_samples.py): one prefill, k samples sharing its KV. The
reference for sample i: a separate n=1 request with seed + i."""
from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.sampling_params import SamplingParamsError
from tests.helpers import make_checkpoint, make_llm, token_prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("n")
    cfg = make_checkpoint(path, num_key_value_heads=2, std=0.3)
    return str(path), cfg


def sampled(**kw):
    return SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, ignore_eos=True, logprobs=1, **kw)


def test_sample_i_equals_a_single_request_seeded_with_seed_plus_i(ckpt):
    path, cfg = ckpt
    prompts = token_prompts(2, cfg.vocab_size, seed=4, min_len=10, max_len=30)
    llm = make_llm(path, show_progress=False, block_size=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampled(n=3, seed=100), use_tqdm=False)
    single = make_llm(path, show_progress=False, block_size=4)
    for p, out in zip(prompts, outs):
        assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
        for i, comp in enumerate(out.outputs):
            ref = single.generate([{"prompt_token_ids": p}], sampled(seed=100 + i), use_tqdm=False)[0].outputs[0]
            assert comp.token_ids == ref.token_ids
            assert comp.cumulative_logprob == pytest.approx(ref.cumulative_logprob, abs=1e-4)
            assert len(comp.logprobs) == 12
        assert len({tuple(c.token_ids) for c in out.outputs}) > 1      # the seeds differ
    assert llm.scheduler.num_prefill_tokens == sum(map(len, prompts))  # one prefill each


def test_greedy_n_gives_identical_copies_and_shares_the_prompt_blocks(ckpt):
    path, cfg = ckpt
    prompt = token_prompts(1, cfg.vocab_size, seed=6, min_len=22, max_len=22)[0]
    llm = make_llm(path, show_progress=False, block_size=4)
    rid = llm.add_request({"prompt_token_ids": prompt},
                          SamplingParams(temperature=0, n=4, max_tokens=10, ignore_eos=True))
    llm.step()                                   # the prefill: 6 blocks, 3 partial copies
    assert llm.block_manager.get_stats()["used"] == 6 + 3
    seen = []
    while llm.has_unfinished_requests():
        outs = llm.step()
        assert len({o.request_id for o in outs}) == len(outs)          # one output per request
        seen += outs
    final = seen[-1]
    assert final.request_id == rid and final.finished and len(final.outputs) == 4
    ref = make_llm(path, show_progress=False).generate(
        [{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        use_tqdm=False)[0].outputs[0]
    assert all(c.token_ids == ref.token_ids for c in final.outputs)


def test_samples_survive_preemption_and_abort_ends_them_all(ckpt):
    path, cfg = ckpt
    prompt = token_prompts(1, cfg.vocab_size, seed=7, min_len=15, max_len=15)[0]
    p = SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=30, ignore_eos=True)

    def run(blocks):
        llm = make_llm(path, show_progress=False, block_size=4, num_kv_blocks=blocks, max_model_len=64)
        out = llm.generate([{"prompt_token_ids": prompt}], p, use_tqdm=False)[0]
        return [c.token_ids for c in out.outputs], llm.scheduler.num_preemptions

    roomy, n_roomy = run(200)
    tight, n_tight = run(22)
    assert n_roomy == 0 and n_tight > 0 and tight == roomy
    llm = make_llm(path, show_progress=False, block_size=4)
    rid = llm.add_request({"prompt_token_ids": prompt}, p)
    llm.step()
    llm.step()
    assert llm.abort(rid) and not llm.has_unfinished_requests()
    assert llm.block_manager.get_stats()["used"] == 0


@pytest.mark.parametrize("kw, match", [(dict(n=0), "n"), (dict(n=2, hold=True), "hold"),
                                       (dict(n=1.5), "n"), (dict(n=2, best_of=4), "best_of")])
def test_bad_n(kw, match):
    with pytest.raises(SamplingParamsError, match=match):
        SamplingParams(**kw)


def test_a_fork_of_one_sample_is_a_request_of_its_own(ckpt):
    path, cfg = ckpt
    prompt = token_prompts(1, cfg.vocab_size, seed=8)[0]
    llm = make_llm(path, show_progress=False, block_size=4)
    rid = llm.add_request({"prompt_token_ids": prompt},
                          SamplingParams(temperature=0, n=2, max_tokens=6, ignore_eos=True))
    llm.step()
    llm.step()
    (kid,) = llm.fork(f"{rid}#1")
    finals = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                finals[out.request_id] = out
    assert len(finals[rid].outputs) == 2 and len(finals[kid].outputs) == 1
    assert finals[kid].outputs[0].token_ids == finals[rid].outputs[1].token_ids
    assert llm.block_manager.get_stats()["used"] == 0
