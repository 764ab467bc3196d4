"""SamplingParams(hold=True), LLM.extend / release, and forks of held requests
(engine/core/held.py). The reference for every extended turn: a fresh request whose prompt is
the whole sequence, on an engine that never held anything. The cost: prefilled
positions as the scheduler counts them."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.errors import InvalidRequestError
from tests.helpers import finish_all, make_checkpoint, make_llm, token_prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hold")
    cfg = make_checkpoint(path, num_key_value_heads=2, std=0.3, max_position_embeddings=2048)
    return str(path), cfg


@pytest.fixture(scope="module")
def fresh(ckpt):
    """Greedy tokens of a fresh request (prompt ids, params) on a plain engine."""
    llm = make_llm(ckpt[0], show_progress=False, enable_prefix_caching=False)

    def run(prompt, params):
        return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    return run



def words(cfg, n, seed):
    return torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = dict(temperature=0, ignore_eos=True)


def test_extend_prefills_only_the_new_tokens_and_equals_a_fresh_request(ckpt, fresh):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=16, max_model_len=1400)
    prompt = [1] + words(cfg, 1023, 0)
    rid = llm.add_request({"prompt_token_ids": prompt}, SamplingParams(max_tokens=3, hold=True, **GREEDY))
    first = finish_all(llm)[rid].outputs[0]
    assert first.finish_reason == "length" and llm.block_manager.get_stats()["used"] > 0
    passage = words(cfg, 100, 1)
    before = llm.scheduler.num_prefill_tokens
    params = SamplingParams(max_tokens=6, repetition_penalty=1.3, logprobs=1, **GREEDY)
    assert llm.extend(rid, passage, params) == rid
    out = finish_all(llm)[rid]
    # the 100 new tokens and the previous turn's last token (sampled, never fed back)
    assert llm.scheduler.num_prefill_tokens - before == 101
    context = prompt + first.token_ids + passage
    assert out.prompt_token_ids == context
    ref = fresh(context, params)
    assert out.outputs[0].token_ids == ref.token_ids
    assert out.outputs[0].cumulative_logprob == pytest.approx(ref.cumulative_logprob, abs=1e-3)
    assert llm.block_manager.get_stats()["used"] == 0          # not held this time: freed


def test_prefill_only_hold_then_passage_branches_from_one_prefill(ckpt, fresh):
    """Self-RAG's passage branching: hold the question (max_tokens=0), fork it per
    passage, extend each child with its passage. The question is prefilled once."""
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=8)
    question = [1] + words(cfg, 60, 2)
    rid = llm.add_request({"prompt_token_ids": question}, SamplingParams(max_tokens=0, hold=True))
    held = finish_all(llm)[rid]
    assert held.outputs[0].token_ids == [] and held.outputs[0].finish_reason == "length"
    assert llm.scheduler.num_prefill_tokens == 61
    kids = llm.fork(rid, n=2)
    passages = [words(cfg, 25, 3), words(cfg, 31, 4), words(cfg, 9, 5)]
    params = SamplingParams(max_tokens=5, **GREEDY)
    for r, passage in zip([rid] + kids, passages):
        llm.extend(r, passage, params)
    finals = finish_all(llm)
    assert llm.scheduler.num_prefill_tokens == 61 + 25 + 31 + 9
    for r, passage in zip([rid] + kids, passages):
        assert finals[r].outputs[0].token_ids == fresh(question + passage, params).token_ids
    assert llm.block_manager.get_stats()["used"] == 0


def test_held_blocks_are_dropped_under_pressure_and_extend_recomputes(ckpt, fresh):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=4, num_kv_blocks=40, max_model_len=120,
                   enable_prefix_caching=False)
    prompt = [1] + words(cfg, 70, 6)
    rid = llm.add_request({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, hold=True, **GREEDY))
    first = finish_all(llm)[rid].outputs[0]
    other = llm.add_request({"prompt_token_ids": [1] + words(cfg, 90, 7)},     # needs the held blocks
                            SamplingParams(max_tokens=30, **GREEDY))
    finish_all(llm)
    assert llm.scheduler.num_held_dropped == 1 and llm.scheduler.num_preemptions == 0
    passage = words(cfg, 12, 8)
    params = SamplingParams(max_tokens=4, **GREEDY)
    llm.extend(rid, passage, params)
    out = finish_all(llm)[rid].outputs[0]
    assert out.token_ids == fresh(prompt + first.token_ids + passage, params).token_ids
    assert other != rid


def test_release_abort_and_bad_calls(ckpt):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=4)
    prompts = token_prompts(3, cfg.vocab_size, seed=9)
    ids = [llm.add_request({"prompt_token_ids": p}, SamplingParams(max_tokens=2, hold=True, **GREEDY))
           for p in prompts]
    finish_all(llm)
    assert llm.block_manager.get_stats()["used"] > 0
    assert llm.release(ids[0]) and not llm.release(ids[0])
    assert llm.abort(ids[1]) and not llm.abort(ids[1])
    with pytest.raises(InvalidRequestError, match="not held"):
        llm.extend(ids[0], [5])
    with pytest.raises(InvalidRequestError, match="not in"):
        llm.extend(ids[2], [cfg.vocab_size])
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        llm.extend(ids[2], [5] * 2100)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        llm.extend(ids[2], [5], SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequestError, match="hold"):
        SamplingParams(max_tokens=0)
    llm.extend(ids[2], [], SamplingParams(max_tokens=3, **GREEDY))   # go on from its last token
    assert len(finish_all(llm)[ids[2]].outputs[0].token_ids) == 3
    assert llm.block_manager.get_stats()["used"] == 0


def test_replace_last_continues_with_another_token_than_the_sampled_one(ckpt, fresh):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=4)
    prompt = [1] + words(cfg, 21, 9)
    rid = llm.add_request({"prompt_token_ids": prompt}, SamplingParams(max_tokens=3, hold=True, **GREEDY))
    first = finish_all(llm)[rid].outputs[0].token_ids
    chosen = (first[-1] + 7) % cfg.vocab_size
    before = llm.scheduler.num_prefill_tokens
    params = SamplingParams(max_tokens=5, **GREEDY)
    llm.extend(rid, [chosen, 11], params, replace_last=True)
    out = finish_all(llm)[rid]
    assert llm.scheduler.num_prefill_tokens - before == 2            # the two new tokens only
    context = prompt + first[:-1] + [chosen, 11]
    assert out.prompt_token_ids == context
    assert out.outputs[0].token_ids == fresh(context, params).token_ids
    hold0 = llm.add_request({"prompt_token_ids": prompt}, SamplingParams(max_tokens=0, hold=True))
    finish_all(llm)
    with pytest.raises(InvalidRequestError, match="cannot be replaced"):
        llm.extend(hold0, [5], params, replace_last=True)
    with pytest.raises(InvalidRequestError, match="at least one token"):
        llm.extend(hold0, [], params, replace_last=True)
    llm.release(hold0)


def test_wait_returns_the_given_requests_and_keeps_the_others_outputs(ckpt):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=4)
    a = llm.add_request({"prompt_token_ids": [1, 5, 6]}, SamplingParams(max_tokens=6, **GREEDY))
    b = llm.add_request({"prompt_token_ids": [1, 7, 8]}, SamplingParams(max_tokens=2, **GREEDY))
    got = llm.wait([a])
    assert list(got) == [a] and got[a].finished and len(got[a].outputs[0].token_ids) == 6
    kept = llm.step()                       # b finished during the wait: its output comes now
    assert [o.request_id for o in kept] == [b] and len(kept[0].outputs[0].token_ids) == 2
    with pytest.raises(RuntimeError, match="not running"):
        llm.wait([a])
