"""Speculative decoding (engine/spec_decode/speculator.py): greedy output identical to plain
decoding, token for token, with log-probs within the parity tolerance, whatever the
drafts; the reference is the same engine without speculation. An oracle proposer (it
knows the plain run's tokens and corrupts some) exercises full, partial and no
acceptance; the n-gram proposer the real path."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from tests.helpers import finish_all, make_checkpoint, make_llm, token_prompts
from tests.test_engine_parity import VARIANTS


class Oracle:
    """Proposes the plain run's next tokens; every ``wrong``-th draft position is wrong."""

    def __init__(self, futures: dict, wrong: int = 3):
        self.futures, self.wrong, self.calls = futures, wrong, 0

    def propose(self, seq_id, token_ids, k):
        self.calls += 1
        for prompt, full in self.futures.items():
            if tuple(token_ids[:len(prompt)]) == prompt and list(token_ids) == full[:len(token_ids)]:
                d = full[len(token_ids):len(token_ids) + k]
                return [t if (self.calls + j) % self.wrong else (t + 1) % 7 for j, t in enumerate(d)]
        return []


def plain_and_spec(path, prompts, params, spec_config=None, oracle_wrong=3, **kw):
    plain = make_llm(path, show_progress=False, block_size=4, **kw).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    if spec_config is None:
        # the oracle knows where plain greedy goes with no stop at all, so its drafts run
        # past EOS, stop ids, stop strings and max_tokens
        free = make_llm(path, show_progress=False).generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
        futures = {tuple(p): p + o.outputs[0].token_ids for p, o in zip(prompts, free)}
        spec_config = {"method": "custom", "num_speculative_tokens": 4, "proposer": Oracle(futures, oracle_wrong)}
    llm = make_llm(path, show_progress=False, block_size=4, speculative_config=spec_config, **kw)
    spec = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return plain, spec, llm


def assert_same(plain, spec):
    for a, b in zip(plain, spec):
        x, y = a.outputs[0], b.outputs[0]
        assert y.token_ids == x.token_ids and y.text == x.text and y.finish_reason == x.finish_reason
        assert y.cumulative_logprob == pytest.approx(x.cumulative_logprob, abs=1e-3)
        if x.logprobs is not None:
            for s, t in zip(x.logprobs, y.logprobs):
                assert s.keys() == t.keys()
                assert all(t[i].logprob == pytest.approx(s[i].logprob, abs=1e-4) for i in s)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_is_identical_on_every_parity_checkpoint(tmp_path, variant):
    cfg = make_checkpoint(tmp_path, std=0.3, **VARIANTS[variant])
    prompts = token_prompts(3, cfg.vocab_size, seed=len(variant), min_len=4, max_len=30)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    plain, spec, llm = plain_and_spec(str(tmp_path), prompts, params)
    assert_same(plain, spec)
    drafted = sum(o.num_draft_tokens for o in spec)
    accepted = sum(o.num_accepted_tokens for o in spec)
    assert drafted > 0 and 0 < accepted < drafted          # full, partial and rejected runs
    assert llm.speculator.num_verify_steps < llm.num_steps or llm.num_steps < 24
    assert llm.block_manager.get_stats()["used"] == 0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec")
    cfg = make_checkpoint(path, num_key_value_heads=2, std=0.3)
    return str(path), cfg


def test_stops_inside_an_accepted_run_cut_where_plain_decoding_stops(ckpt):
    path, cfg = ckpt
    prompts = token_prompts(4, cfg.vocab_size, seed=9, min_len=6, max_len=20)
    probe = make_llm(path, show_progress=False).generate([{"prompt_token_ids": p} for p in prompts],
                                                         SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                                                         use_tqdm=False)
    stop_id = probe[0].outputs[0].token_ids[7]          # a token the first run writes mid-way
    for params in (SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]),
                   SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=30)):
        plain, spec, _ = plain_and_spec(path, prompts, params, oracle_wrong=50)
        assert_same(plain, spec)
        if params.stop_token_ids:
            assert spec[0].outputs[0].token_ids[-1] == stop_id and len(spec[0].outputs[0].token_ids) == 8


def test_a_stop_string_inside_an_accepted_run_cuts_the_text_as_plain_decoding_does():
    from selfrag.default_model import default_model_dir
    path = default_model_dir()
    prompt = "### Instruction:\nWhat were alpacas bred for?\n\n### Response:\n"
    free = make_llm(path, show_progress=False).generate([prompt], SamplingParams(temperature=0, max_tokens=40),
                                                       use_tqdm=False)[0].outputs[0]
    stop = free.text[12:16]                              # text the answer reaches mid-way
    from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
    ids = Tokenizer.from_pretrained(path).encode(prompt)
    oracle = Oracle({tuple(ids): ids + free.token_ids}, wrong=50)
    for params in (SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
                   SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True)):
        plain = make_llm(path, show_progress=False).generate([prompt], params, use_tqdm=False)
        llm = make_llm(path, show_progress=False, speculative_config={
            "method": "custom", "num_speculative_tokens": 4, "proposer": oracle})
        spec = llm.generate([prompt], params, use_tqdm=False)
        assert_same(plain, spec)
        assert spec[0].outputs[0].stop_reason == stop and spec[0].num_accepted_tokens > 0


def test_mixed_batches_preemption_and_prefix_caching_keep_plain_tokens(ckpt):
    path, cfg = ckpt
    prompts = token_prompts(5, cfg.vocab_size, seed=11, min_len=10, max_len=30)
    prompts.append(prompts[0])                           # a prefix-cache hit
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    others = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logit_bias={5: 3.0}),
              SamplingParams(temperature=0.9, seed=4, max_tokens=30, ignore_eos=True)]
    params = [greedy, others[0], greedy, others[1], greedy, greedy]
    for blocks in (200, 40):                              # roomy, then tight: preemption
        plain, spec, llm = plain_and_spec(path, prompts, params, num_kv_blocks=blocks, max_model_len=64)
        assert_same(plain, spec)
        # the sampled request: the oracle knows only greedy continuations, so it gets no
        # drafts here and its seeded tokens equal plain decoding's
        assert spec[3].num_draft_tokens == 0
        assert spec[1].num_draft_tokens > 0                   # a knob: verified position by position
        if blocks == 40:
            assert llm.scheduler.num_preemptions > 0
        assert llm.block_manager.get_stats()["used"] == 0


def test_ngram_drafts_on_repetitive_text_and_back_off_on_none(ckpt):
    path, cfg = ckpt
    loop = [1] + [11, 12, 13, 14, 15, 16] * 6
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain, spec, llm = plain_and_spec(path, [loop], params,
                                      spec_config={"method": "ngram", "num_speculative_tokens": 4})
    assert_same(plain, spec)

    class Wrong:
        def propose(self, seq_id, token_ids, k):
            return [(token_ids[-1] + 1 + j) % cfg.vocab_size for j in range(k)]
    plain, spec, llm = plain_and_spec(path, [loop], params, spec_config={
        "method": "custom", "num_speculative_tokens": 4, "proposer": Wrong()})
    assert_same(plain, spec)
    # each miss doubles the wait before the next offer: few verify steps over 40 tokens
    assert llm.speculator.num_verify_steps <= 8 and spec[0].num_accepted_tokens <= 1


def test_bad_configs():
    from engine.spec_decode.speculator import Speculator
    for cfg, match in (({"method": "eagle", "num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram"}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unknown"),
                       ({"method": "custom", "num_speculative_tokens": 2}, "proposer"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
                         "prompt_lookup_max": 2}, "prompt_lookup")):
        with pytest.raises(ValueError, match=match):
            Speculator(cfg)


def test_finished_and_aborted_sequences_leave_no_proposer_state(ckpt):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    prompts = token_prompts(6, cfg.vocab_size, seed=2)
    rids = [llm.add_request({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=8)) for p in prompts]
    llm.step()
    llm.step()
    llm.abort(rids[0])
    finish_all(llm)
    assert llm.speculator.proposer._index == {} and llm.speculator._wait == {}


@pytest.mark.parametrize("knobs", [dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3),
                                   dict(logit_bias={3: 2.0, 9: -1.5}, min_tokens=10),
                                   dict(bad_words_ids=[[11, 12]])])
def test_knobs_and_processors_apply_at_every_verified_position(ckpt, knobs):
    """Penalties, bias, min_tokens, a two-token bad word and a batched processor that
    depends on the output length: each verified position sees what a plain step sees."""
    path, cfg = ckpt
    prompts = token_prompts(3, cfg.vocab_size, seed=21, min_len=8, max_len=25)
    calls = []

    def every_third(logits, request_ids, output_token_ids):     # bans token 7 after 3k tokens
        calls.append(list(request_ids))
        for row, out in enumerate(output_token_ids):
            if len(out) % 3 == 0:
                logits[row, 7] = float("-inf")
        return logits
    bad = knobs.pop("bad_words_ids", None)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=1,
                            logits_processors=[every_third], **knobs)
    if bad:
        params.bad_words_token_ids = bad
    plain, spec, llm = plain_and_spec(path, prompts, params, oracle_wrong=4)
    assert_same(plain, spec)
    assert sum(o.num_accepted_tokens for o in spec) > 0
    assert all(len(set(c)) == len(c) for c in calls)         # a request id once per call


def test_a_processor_failing_only_at_a_rejected_draft_does_not_fail_the_request(ckpt):
    """Plain decoding never calls the processor on a rejected draft, so its failure there
    is not the request's; a failure where plain decoding does reach still fails it."""
    path, cfg = ckpt
    prompt = token_prompts(1, cfg.vocab_size, seed=5, min_len=10, max_len=12)[0]
    free = make_llm(path, show_progress=False).generate(
        [{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    wrong = next(t for t in range(cfg.vocab_size) if t not in free)

    class WrongSecond:                 # the right next token, then one plain decoding never picks
        def propose(self, seq_id, token_ids, k):
            n = len(token_ids) - len(prompt)
            return [free[n], wrong] if n + 1 < len(free) else []

    def allergic(logits, request_ids, output_token_ids):
        for out in output_token_ids:
            if out and out[-1] == wrong:
                raise RuntimeError("saw the wrong token")
        return logits
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logits_processors=[allergic])
    plain, spec, llm = plain_and_spec(path, [prompt], params, spec_config={
        "method": "custom", "num_speculative_tokens": 2, "proposer": WrongSecond()})
    assert plain[0].error is None
    assert_same(plain, spec)
    assert spec[0].error is None and spec[0].num_accepted_tokens > 0

    def fails_late(logits, request_ids, output_token_ids):    # plain decoding reaches 5 tokens
        if any(len(out) == 5 for out in output_token_ids):
            raise RuntimeError("five")
        return logits
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logits_processors=[fails_late])
    plain, spec, llm = plain_and_spec(path, [prompt], params)
    assert plain[0].outputs[0].finish_reason == spec[0].outputs[0].finish_reason == "error"
    assert "five" in plain[0].error and "five" in spec[0].error
    assert spec[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_self_rag_answers_are_identical_with_speculation():
    """The reflection grammar (a batched processor), 16 reflection log-probs per step, hold
    / fork / extend branching: the trained miniature model's answers, token for token."""
    from engine import LLM
    from selfrag import Passage, SelfRAG
    from selfrag.default_model import default_model_dir
    passages = [Passage("Alpaca", "Alpacas were bred specifically for their fiber, which is soft and warm."),
                Passage("Llama", "Llamas are used as pack animals by Andean cultures.")]
    results = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 4}):
        rag = SelfRAG(LLM(default_model_dir(), show_progress=False, speculative_config=spec))
        short = rag.answer("What were alpacas bred for?", passages=passages, mode="always", max_tokens=40)
        long = rag.generate_long("What were alpacas bred for?", passages=passages, beam_width=2, max_depth=2,
                                 segment_tokens=20)
        results.append((short, long, rag.llm))
    (s0, l0, _), (s1, l1, llm) = results
    assert [c.token_ids for c in s1.candidates] == [c.token_ids for c in s0.candidates]
    assert [c.scores.final for c in s1.candidates] == pytest.approx([c.scores.final for c in s0.candidates],
                                                                    abs=1e-4)
    assert [n["text"] for n in l1.tree] == [n["text"] for n in l0.tree] and s1.answer == s0.answer
    assert llm.speculator.num_drafted > 0


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                dict(temperature=1.3, top_p=0.8)])
def test_speculative_sampling_keeps_the_distribution(kw):
    """A deterministic draft kept with probability p(draft), else a draw from p without
    it: over many seeds the token is distributed as plain sampling's (chi-square on an
    8-token vocabulary, the draft both likely and unlikely)."""
    from engine.core.sequence import Sequence
    from engine.sampling.sampler import Sampler
    from kernels import ops as kernel_ops
    ops = kernel_ops.get_ops("auto", "cpu")
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0]])
    sampler = Sampler(torch.device("cpu"), 0)
    # the distribution plain sampling draws from (the filters applied), by plain draws
    n = 6000
    for draft in (7, 2):
        counts = torch.zeros(8)
        plain = torch.zeros(8)
        for i in range(n):
            seq = Sequence([1], f"r{i}", SamplingParams(seed=i, **kw))
            t, _, _ = sampler.launch(logits.clone(), [seq], ops, [draft]).wait()
            counts[t[0]] += 1
            seq = Sequence([1], f"p{i}", SamplingParams(seed=10 ** 6 + i, **kw))
            t, _, _ = sampler.launch(logits.clone(), [seq], ops).wait()
            plain[t[0]] += 1
        seen = (counts + plain) > 0
        expected = (counts + plain)[seen] / 2
        chi2 = float((((counts[seen] - expected) ** 2 + (plain[seen] - expected) ** 2) / expected).sum())
        assert chi2 < 30.0, (draft, counts.tolist(), plain.tolist())     # 7 dof: p < 1e-4 beyond 29.9
        assert counts[draft] > 0


def test_sampled_requests_speculate_and_finish_cleanly(ckpt):
    path, cfg = ckpt
    loop = [1] + [11, 12, 13, 14, 15, 16] * 6
    llm = make_llm(path, show_progress=False, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    outs = llm.generate([{"prompt_token_ids": loop}] * 3,
                        [SamplingParams(temperature=t, seed=s, max_tokens=30, ignore_eos=True, logprobs=0)
                         for t, s in ((0.3, 1), (0.8, 2), (1.0, 3))], use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 30 and len(o.outputs[0].logprobs) == 30 for o in outs)
    assert sum(o.num_draft_tokens for o in outs) > 0
    assert llm.block_manager.get_stats()["used"] == 0 and not llm.has_unfinished_requests()


def test_grammar_drafts_and_the_self_rag_switch():
    """Tokens the reflection grammar makes certain are drafted (and accepted: the model
    writes what the grammar forces); SelfRAG(speculative=True) turns speculation on and
    changes no answer."""
    from engine import LLM
    from selfrag import Passage, SelfRAG
    from selfrag.constraints import ReflectionConstraint
    from selfrag.default_model import default_model_dir
    from selfrag.vocab import ReflectionVocab
    passages = [Passage("Alpaca", "Alpacas were bred specifically for their fiber."),
                Passage("Llama", "Llamas are used as pack animals.")]
    plain = SelfRAG(LLM(default_model_dir(), show_progress=False))
    ref = plain.answer("What were alpacas bred for?", passages=passages, mode="always", max_tokens=40)
    grammar = SelfRAG(LLM(default_model_dir(), show_progress=False,
                          speculative_config={"method": "grammar", "num_speculative_tokens": 2}))
    got = grammar.answer("What were alpacas bred for?", passages=passages, mode="always", max_tokens=40)
    assert [c.token_ids for c in got.candidates] == [c.token_ids for c in ref.candidates]
    assert grammar.llm.speculator.num_accepted > 0          # e.g. </s> after a utility token
    switched = SelfRAG(LLM(default_model_dir(), show_progress=False), speculative=True)
    assert switched.llm.speculator is not None
    again = switched.answer("What were alpacas bred for?", passages=passages, mode="always", max_tokens=40)
    assert [c.token_ids for c in again.candidates] == [c.token_ids for c in ref.candidates]
    v = ReflectionVocab.from_tokenizer(plain.tokenizer)
    proc = ReflectionConstraint(v, plain.vocab_size, mode="always")
    assert proc.forced_token("x", []) == v.retrieval                 # "always": [Retrieval] first
    assert proc.forced_token("x", [v.retrieval]) == v.paragraph_open
    assert proc.forced_token("x", [v.utility[2]]) == v.eos
    assert proc.forced_token("x", [v.relevant, 500]) is None          # evidence text: free


def test_fork_n_hold_and_beam_search_with_speculation(ckpt):
    """The primitives of issue 16 on a speculating engine give plain decoding's tokens."""
    from engine import BeamSearchParams
    path, cfg = ckpt
    loop = [1] + [21, 22, 23, 24, 25] * 5
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = []
    for config in (None, spec):
        llm = make_llm(path, show_progress=False, block_size=4, speculative_config=config)
        n = llm.generate([{"prompt_token_ids": loop}], SamplingParams(n=2, temperature=0, max_tokens=20,
                                                                      ignore_eos=True), use_tqdm=False)[0]
        rid = llm.add_request({"prompt_token_ids": loop}, greedy)
        llm.step()
        llm.step()
        kid = llm.fork(rid)[0]
        forked = finish_all(llm)
        held = llm.add_request({"prompt_token_ids": loop}, SamplingParams(max_tokens=3, hold=True, **dict(
            temperature=0, ignore_eos=True)))
        first = finish_all(llm)[held].outputs[0].token_ids
        llm.extend(held, [21, 22, 23], greedy)
        extended = finish_all(llm)[held].outputs[0].token_ids
        beams = llm.beam_search([{"prompt_token_ids": loop}], BeamSearchParams(beam_width=2, max_tokens=8))[0]
        results.append(([c.token_ids for c in n.outputs], forked[rid].outputs[0].token_ids,
                        forked[kid].outputs[0].token_ids, first, extended, [s.tokens for s in beams.sequences]))
        assert llm.block_manager.get_stats()["used"] == 0
    assert results[0] == results[1]
    assert llm.speculator.num_accepted > 0


def test_disable_by_batch_size_decodes_large_batches_plainly(ckpt):
    """vLLM's key: steps of more than n sequences run plain; smaller ones verify."""
    path, cfg = ckpt
    prompts = token_prompts(3, cfg.vocab_size, seed=31, min_len=6, max_len=12)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (4, 24, 24)]
    free = make_llm(path, show_progress=False).generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
        use_tqdm=False)
    futures = {tuple(p): p + o.outputs[0].token_ids for p, o in zip(prompts, free)}
    config = {"method": "custom", "num_speculative_tokens": 4, "proposer": Oracle(futures, 99),
              "disable_by_batch_size": 2}
    plain = make_llm(path, show_progress=False, block_size=4).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm = make_llm(path, show_progress=False, block_size=4, speculative_config=config)
    sizes = []
    real = llm.speculator.verify
    llm.speculator.verify = lambda ex, seqs, drafts, logits: sizes.append(len(seqs)) or real(ex, seqs, drafts, logits)
    spec = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert_same(plain, spec)
    assert sizes and max(sizes) <= 2                # verify steps only once the batch shrank to 2
    assert llm.num_steps > len(sizes) + 3           # the 3-sequence steps decoded plainly
    with pytest.raises(ValueError, match="disable_by_batch_size"):
        make_llm(path, show_progress=False, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                               "disable_by_batch_size": 0})


def test_acceptance_counted_on_the_device_by_hand():
    """``_accepted_on_device``: per sequence, the drafts equal to the picks before them, up
    to the first mismatch (hand-counted), with sequences of no, one and several drafts."""
    from engine.spec_decode.speculator import Speculator
    from engine.utils.host_to_device import HostToDevice
    seqs = [None] * 4
    drafts = {0: [5, 6, 7], 2: [9], 3: [1, 2, 3, 4]}
    here = [5, 6, 7, -1, -1, 9, -1, 1, 2, 3, 4, -1]
    picks = torch.tensor([5, 6, 8, 0, 3, 9, 2, 1, 7, 3, 4, 5])   # seq 3 mismatches at its 2nd draft
    got = Speculator._accepted_on_device(HostToDevice("cpu"), seqs, drafts, here, picks)
    assert got.tolist() == [2, 0, 1, 1]
