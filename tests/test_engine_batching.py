"""Continuous batching, prefix caching and preemption must not change greedy tokens."""
import pytest

from engine import SamplingParams
from tests.helpers import hf_greedy, hf_model, make_checkpoint, make_llm, token_prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    cfg = make_checkpoint(path, num_key_value_heads=2)
    return str(path), cfg


def _requests(cfg):
    """Prompts of different lengths, some sharing long prefixes (prefix-cache
    hits), with different max_tokens so they finish at different times."""
    base = token_prompts(6, cfg.vocab_size, seed=11, min_len=2, max_len=45)
    shared = base[0] + base[1]                 # 2+ full blocks of 8 shared by three prompts
    prompts = base + [shared + [7, 8], shared + [9], shared]
    lengths = [5, 33, 12, 40, 1, 21, 17, 30, 8]
    return prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]


def _solo(path, prompts, params, **kw):
    out = []
    for p, sp in zip(prompts, params):
        llm = make_llm(path, show_progress=False, block_size=8, **kw)
        [o] = llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)
        out.append(o.outputs[0].token_ids)
    return out


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batch_equals_solo(ckpt, prefix_caching):
    path, cfg = ckpt
    prompts, params = _requests(cfg)
    llm = make_llm(path, show_progress=False, block_size=8, enable_prefix_caching=prefix_caching)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    solo = _solo(path, prompts, params, enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in outs] == solo
    assert [len(t) for t in solo] == [sp.max_tokens for sp in params]
    stats = llm.block_manager.get_stats()
    if prefix_caching:
        assert stats["prefix_cache_hits"] > 0         # the shared prompts really reused blocks
    # everything freed: the whole pool is allocatable again
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_solo_equals_hf(ckpt):
    """Anchor the batch test to an independent reference."""
    path, cfg = ckpt
    prompts, params = _requests(cfg)
    hf = hf_model(path)
    solo = _solo(path, prompts[6:8], params[6:8])
    for p, sp, got in zip(prompts[6:8], params[6:8], solo):
        assert got == hf_greedy(hf, p, sp.max_tokens)[0]


def test_continuous_batching_joins_running_batch(ckpt):
    """Requests added while others decode join them; results equal solo runs."""
    path, cfg = ckpt
    prompts, params = _requests(cfg)
    llm = make_llm(path, show_progress=False, block_size=8)
    done, pending = {}, list(zip(prompts, params))
    rid_to_i = {}
    steps = 0
    while pending or llm.has_unfinished_requests():
        if pending and steps % 3 == 0:           # one new request every 3 steps
            p, sp = pending.pop(0)
            rid_to_i[llm.add_request({"prompt_token_ids": p}, sp)] = len(rid_to_i)
        for out in llm.step():
            if out.finished:
                done[rid_to_i[out.request_id]] = out.outputs[0].token_ids
        steps += 1
        assert steps < 2000
    assert [done[i] for i in range(len(prompts))] == _solo(path, prompts, params)


def test_preemption_recomputes_without_loss(ckpt):
    """A pool far too small for the batch forces preemption; nothing is lost or duplicated."""
    path, cfg = ckpt
    prompts, params = _requests(cfg)
    llm = make_llm(path, show_progress=False, block_size=8, num_kv_blocks=16, max_model_len=128)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    assert [o.outputs[0].token_ids for o in outs] == _solo(path, prompts, params)
    assert llm.block_manager.num_free_blocks == 16


def test_max_num_seqs_and_token_budget(ckpt):
    path, cfg = ckpt
    prompts, params = _requests(cfg)
    llm = make_llm(path, show_progress=False, block_size=8, max_num_seqs=2, max_num_batched_tokens=50)
    sched, seen = llm.scheduler, []
    real = sched.schedule

    def recording():
        batch = real()
        seqs, is_prefill = batch.seqs, batch.is_prefill
        new = sum(len(s) - s.num_cached_tokens for s in seqs) if is_prefill else len(seqs)
        seen.append((len(sched.running), len(seqs), new, is_prefill))
        return batch

    sched.schedule = recording
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [sp.max_tokens for sp in params]
    assert max(r for r, *_ in seen) == 2
    # a prefill step stays within the token budget unless it is a single (long) prompt
    assert all(new <= 50 or n == 1 for _, n, new, pre in seen if pre)
    assert any(pre and n == 2 for _, n, new, pre in seen)


def test_abort_frees_blocks_and_engine_goes_on(ckpt):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=8)
    rid = llm.add_request({"prompt_token_ids": list(range(1, 60))},
                          SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    llm.step()
    llm.step()
    assert llm.block_manager.num_free_blocks < llm.block_manager.num_blocks
    assert llm.abort(rid) and not llm.abort(rid)
    assert not llm.has_unfinished_requests()
    llm.block_manager.reset_prefix_cache()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    [o] = llm.generate({"prompt_token_ids": [1, 4, 5]}, SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)
    assert len(o.outputs[0].token_ids) == 4


def test_seeded_sampling_is_reproducible_and_batch_independent(ckpt):
    path, cfg = ckpt
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=20, seed=1234, ignore_eos=True)
    llm = make_llm(path, show_progress=False)
    a = llm.generate({"prompt_token_ids": [1, 9, 8, 7]}, sp, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate([{"prompt_token_ids": [1, 3, 3]}, {"prompt_token_ids": [1, 9, 8, 7]}],
                     [SamplingParams(temperature=1.0, max_tokens=5), sp], use_tqdm=False)
    assert b[1].outputs[0].token_ids == a
    c = llm.generate({"prompt_token_ids": [1, 9, 8, 7]},
                     SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=20, seed=99,
                                    ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert c != a


def test_top_k_1_sampling_equals_greedy(ckpt):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False)
    p = {"prompt_token_ids": [1, 50, 60, 70]}
    g = llm.generate(p, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True), use_tqdm=False)
    s = llm.generate(p, SamplingParams(temperature=1.3, top_k=1, max_tokens=15, ignore_eos=True),
                     use_tqdm=False)
    assert g[0].outputs[0].token_ids == s[0].outputs[0].token_ids


def test_logits_processor_is_batched_and_respected(ckpt):
    """A processor banning one token: one call per step for all rows, and HF with the
    same ban gives the same tokens; log-probs stay those of the raw logits."""
    path, cfg = ckpt
    hf = hf_model(path)
    prompts = token_prompts(3, cfg.vocab_size, seed=5)
    free_tokens, _ = hf_greedy(hf, prompts[0], 10)
    banned = free_tokens[0]
    calls = []

    class Ban:
        def __call__(self, logits, request_ids, output_token_ids):
            calls.append((logits.shape[0], list(request_ids), [list(t) for t in output_token_ids]))
            logits[:, banned] = float("-inf")
            return logits

    ban = Ban()
    llm = make_llm(path, show_progress=False)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logits_processors=[ban],
                        logprob_token_ids=[banned])
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref, rows = hf_greedy(hf, p, 10, banned=banned)
        assert o.outputs[0].token_ids == ref and banned not in ref
        assert o.outputs[0].logprobs[0][banned].logprob == pytest.approx(float(rows[0][banned]), abs=1e-4)
    assert calls[0][0] == 3 and len(calls) == 10          # one batched call per step
    assert calls[1][2] == [[o.outputs[0].token_ids[0]] for o in outs]
