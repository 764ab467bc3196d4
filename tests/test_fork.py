"""LLM.fork (engine/core/forking.py): children continue exactly as their parent would, share
its KV, survive preemption, and carry the per-request state over. References: the
parent's own continuation, and a fresh request whose prompt is the parent's sequence."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.errors import InvalidRequestError
from tests.helpers import finish_all, make_checkpoint, make_llm, token_prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fork")
    cfg = make_checkpoint(path, num_key_value_heads=2, std=0.3, max_position_embeddings=4096)
    return str(path), cfg


def step_until_generated(llm, rid, k) -> None:
    while llm.num_generated_tokens(rid) < k:
        llm.step()



@pytest.mark.parametrize("async_output", [False, True])
def test_greedy_children_equal_the_parents_continuation(ckpt, async_output):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=4)
    llm.async_output = async_output           # the deferred-text path, also on the CPU
    prompt, other = token_prompts(2, cfg.vocab_size, seed=3, min_len=9, max_len=9)
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    rid = llm.add_request({"prompt_token_ids": prompt}, p)
    llm.add_request({"prompt_token_ids": other}, p)          # a neighbour in the batch
    step_until_generated(llm, rid, 5)
    free = llm.block_manager.num_free_blocks
    kids = llm.fork(rid, n=3)
    assert kids == [f"{rid}.1", f"{rid}.2", f"{rid}.3"]
    # 9 + 5 = 14 tokens, 13 with KV: three full blocks shared, the partial one copied
    assert free - llm.block_manager.num_free_blocks == 3
    finals = finish_all(llm)
    parent = finals[rid].outputs[0]
    assert len(parent.token_ids) == 20
    for k in kids:
        child = finals[k].outputs[0]
        assert child.token_ids == parent.token_ids and child.text == parent.text
        assert child.cumulative_logprob == pytest.approx(parent.cumulative_logprob, abs=1e-4)
        assert [sorted(d) for d in child.logprobs] == [sorted(d) for d in parent.logprobs]
        assert finals[k].prompt_token_ids == prompt
    assert llm.block_manager.get_stats()["used"] == 0


def test_a_child_with_its_own_params_equals_a_fresh_request_on_the_parents_sequence(ckpt):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=4)
    prompt = token_prompts(1, cfg.vocab_size, seed=5, min_len=11, max_len=11)[0]
    rid = llm.add_request({"prompt_token_ids": prompt},
                          SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    step_until_generated(llm, rid, 6)
    seq_at_fork = list(llm.core.requests[rid].seq.token_ids)
    own = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logit_bias={5: 3.0, 9: 2.5},
                         logprobs=1)
    (kid,) = llm.fork(rid, params=own)
    finals = finish_all(llm)
    child = finals[kid].outputs[0]
    assert len(child.token_ids) == 6 + 7 and child.finish_reason == "length"   # max_tokens from the fork
    assert child.token_ids[:6] == finals[rid].outputs[0].token_ids[:6]
    assert child.logprobs[:6] == [{}] * 6            # the parent recorded none before the fork
    fresh = make_llm(path, show_progress=False, block_size=4).generate(
        [{"prompt_token_ids": seq_at_fork}], own, use_tqdm=False)[0].outputs[0]
    assert child.token_ids[6:] == fresh.token_ids
    for mine, ref in zip(child.logprobs[6:], fresh.logprobs):
        assert mine.keys() == ref.keys()
        assert all(mine[t].logprob == pytest.approx(ref[t].logprob, abs=1e-4) for t in ref)


def test_forks_survive_preemption(ckpt):
    """A pool too small for every child: children are preempted and recomputed, and each
    still equals the parent (the reference: the same forks with a large pool)."""
    path, cfg = ckpt
    prompt = token_prompts(1, cfg.vocab_size, seed=8, min_len=13, max_len=13)[0]
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    def run(blocks):
        llm = make_llm(path, show_progress=False, block_size=4, num_kv_blocks=blocks, max_model_len=64)
        rid = llm.add_request({"prompt_token_ids": prompt}, p)
        step_until_generated(llm, rid, 3)
        kids = llm.fork(rid, n=4)
        finals = finish_all(llm)
        return [finals[i].outputs[0].token_ids for i in [rid] + kids], llm.scheduler.num_preemptions

    roomy, n_roomy = run(200)
    tight, n_tight = run(24)
    assert n_roomy == 0 and n_tight > 0
    assert tight == roomy and all(t == roomy[0] for t in roomy)


def test_seeded_generator_state_and_knob_counts_are_copied(ckpt):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=4)
    prompt = token_prompts(1, cfg.vocab_size, seed=11, min_len=7, max_len=7)[0]
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=25, ignore_eos=True,
                       repetition_penalty=1.4, frequency_penalty=0.3)
    rid = llm.add_request({"prompt_token_ids": prompt}, p)
    step_until_generated(llm, rid, 4)
    kids = llm.fork(rid, n=2)
    finals = finish_all(llm)
    # same generator state, same counts, same logits: a seeded child draws what the parent draws
    assert all(finals[k].outputs[0].token_ids == finals[rid].outputs[0].token_ids for k in kids)
    # the reference: the same request without a fork
    alone = make_llm(path, show_progress=False, block_size=4).generate(
        [{"prompt_token_ids": prompt}], p, use_tqdm=False)[0].outputs[0]
    assert alone.token_ids == finals[rid].outputs[0].token_ids


def test_processors_are_told_and_bad_calls_are_refused(ckpt):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=4)
    calls = []

    class Tracker:
        def __call__(self, logits, request_ids, output_token_ids):
            return logits

        def fork(self, parent_id, child_ids):
            calls.append((parent_id, child_ids))

    prompt = token_prompts(1, cfg.vocab_size, seed=2)[0]
    rid = llm.add_request({"prompt_token_ids": prompt},
                          SamplingParams(temperature=0, max_tokens=8, logits_processors=[Tracker()]))
    llm.step()
    kids = llm.fork(rid, n=2)
    assert calls == [(rid, kids)]
    with pytest.raises(InvalidRequestError, match="neither running nor held"):
        llm.fork("nope")
    with pytest.raises(InvalidRequestError, match="n=0"):
        llm.fork(rid, n=0)
    with pytest.raises(InvalidRequestError, match="temperature"):
        llm.fork(rid, params=SamplingParams(temperature=-1))
    finish_all(llm)
    with pytest.raises(InvalidRequestError, match="neither running nor held"):
        llm.fork(rid)


def test_forking_a_2k_token_request_into_8_allocates_at_most_8_blocks(ckpt):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=16, num_kv_blocks=400, max_model_len=2100)
    prompt = [1] + torch.randint(3, cfg.vocab_size, (2047,), generator=torch.Generator().manual_seed(0)).tolist()
    rid = llm.add_request({"prompt_token_ids": prompt},
                          SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    step_until_generated(llm, rid, 2)
    free = llm.block_manager.num_free_blocks
    llm.fork(rid, n=8)
    assert free - llm.block_manager.num_free_blocks <= 8
    finals = finish_all(llm)
    assert len({tuple(o.outputs[0].token_ids) for o in finals.values()}) == 1
