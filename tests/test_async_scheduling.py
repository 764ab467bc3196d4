"""Async scheduling (engine/engine_core.py): a plain decode step is queued before the last
one is read back. The same CPU code path runs here as on CUDA (the pending input ids are
gathered on the device from the last step's sampled ids; the read-back is only started
early there). Every test compares the engine with ``async_scheduling=True`` against the
same engine with it off, token for token, text, log-probs and finish reasons included, and
checks that the steps really were queued ahead (or, where host state is needed, ran
synchronously, and why)."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from tests.helpers import make_checkpoint, make_llm, token_prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("async_sched")
    cfg = make_checkpoint(path, num_key_value_heads=2)
    return str(path), cfg


def _key(outs):
    """What must be identical: ids, text, finish and stop reasons, errors."""
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] + [o.error] for o in outs]


def _assert_same(sync, async_):
    """Identical tokens and text; log-probs within float noise (a request that finished
    leaves one wasted row in the step queued after it, so a step's batch may differ by a
    row, and a row's matmul result in the last bits with it)."""
    assert _key(async_) == _key(sync)
    for x, y in zip(sync, async_):
        for a, b in zip(x.outputs, y.outputs):
            assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-3)
            for d, e in zip(a.logprobs or (), b.logprobs or ()):
                assert d.keys() == e.keys() and all(abs(d[t].logprob - e[t].logprob) < 1e-4 for t in d)


def _both(path, prompts, params, async_output: bool = False, **kw):
    """(sync outputs, async outputs, the async engine)."""
    runs = []
    for on in (False, True):
        llm = make_llm(path, show_progress=False, async_scheduling=on, **kw)
        llm.async_output = async_output
        assert llm.async_scheduling is on
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert not llm.has_unfinished_requests() and llm.block_manager.get_stats()["used"] == 0
        runs.append(outs)
    return runs[0], runs[1], llm


@pytest.mark.parametrize("async_output", [False, True])
def test_a_mixed_batch_is_identical_and_overlaps(ckpt, async_output):
    """Greedy, seeded sampling, n > 1, stop ids, EOS, top log-probs, different lengths: every
    request finishing at its own step while the next step is already queued."""
    path, cfg = ckpt
    prompts = token_prompts(6, cfg.vocab_size, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=17),
              SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[5, 7, 11, 13, 17, 19]),
              SamplingParams(temperature=0.7, n=3, seed=1, max_tokens=12),
              SamplingParams(temperature=0, max_tokens=25, logprobs=3),
              SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=2, max_tokens=3)]
    sync, async_, llm = _both(path, prompts, params, async_output, block_size=4)
    _assert_same(sync, async_)
    assert any(o.outputs[0].finish_reason == "stop" for o in sync)       # a stop id mid-run
    stats = llm.scheduling_stats
    assert stats["overlapped"] >= 20 and set(stats["sync"]) <= {"prefill"}


def test_prefix_cache_blocks_filled_by_pending_tokens_are_registered(ckpt):
    """A block whose last token was still on the device when its slot was given is hashed
    once the token is read back: a later prompt made of the first request's text hits the
    same cached blocks as without async scheduling."""
    path, cfg = ckpt
    [p] = token_prompts(1, cfg.vocab_size, seed=8, min_len=5, max_len=5)
    sp = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)
    hits = []
    for on in (False, True):
        llm = make_llm(path, show_progress=False, block_size=4, async_scheduling=on)
        first = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0].outputs[0].token_ids
        again = llm.generate([{"prompt_token_ids": p + first}], SamplingParams(temperature=0, max_tokens=4),
                             use_tqdm=False)[0].outputs[0].token_ids
        hits.append((first, again, llm.block_manager.get_stats()["prefix_cache_hit_tokens"]))
        llm.block_manager.check_invariants()
    assert hits[1] == hits[0] and hits[0][2] >= 24          # 6 full blocks of prompt + output


def test_host_side_rows_run_synchronously_and_say_why(ckpt):
    """Rows whose sampling needs the host (a logits processor, the knobs, hold) make their
    steps synchronous; the outputs are the same and the reason is counted."""
    path, cfg = ckpt
    prompts = token_prompts(3, cfg.vocab_size, seed=4)

    def ban_five(token_ids, logits):
        logits[5] = float("-inf")
        return logits
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logits_processors=[ban_five]),
              SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, presence_penalty=1.5, min_tokens=4),
              SamplingParams(temperature=0, max_tokens=18, ignore_eos=True)]
    sync, async_, llm = _both(path, prompts, params)
    _assert_same(sync, async_)
    stats = llm.scheduling_stats
    assert stats["sync"].get("host-side sampling", 0) >= 10
    assert stats["overlapped"] >= 3                    # the plain request alone, at the end


def test_preemption_and_max_model_len(ckpt):
    """A KV pool too small for the batch: the steps that would preempt run synchronously
    (preempted sequences are recomputed as without async scheduling); a sequence reaching
    max_model_len finishes at the same token."""
    path, cfg = ckpt
    prompts = token_prompts(4, cfg.vocab_size, seed=6, min_len=10, max_len=14)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    sync, async_, llm = _both(path, prompts, sp, block_size=4, num_kv_blocks=24, max_model_len=48)
    _assert_same(sync, async_)
    assert llm.scheduler.num_preemptions > 0
    assert {"preemption", "max_model_len"} <= set(llm.scheduling_stats["sync"])


@pytest.mark.parametrize("async_output", [False, True])
def test_stop_strings_and_streaming_text(ckpt, async_output):
    """Stop strings end a request at the same text (the step queued after it is wasted,
    its token never shown); streamed text never takes anything back. With async output
    processing too (CUDA's default): text one step late, stop strings found then."""
    from selfrag.default_model import default_model_dir
    path = default_model_dir()
    outs = []
    for on in (False, True):
        llm = make_llm(path, show_progress=False, async_scheduling=on)
        llm.async_output = async_output
        full = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=24),
                            use_tqdm=False)[0].outputs[0].text
        stop = full.strip().split()[2] if len(full.split()) > 3 else full[3:6]
        cut = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=24, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
        pieces = list(llm.stream("Tell me about llamas.", SamplingParams(temperature=0, max_tokens=20)))
        outs.append((full, cut.text, cut.finish_reason, cut.stop_reason, "".join(pieces)))
        assert cut.finish_reason == "stop" and stop not in cut.text
    assert outs[1] == outs[0]


def test_api_calls_between_steps_read_the_step_in_flight_back(ckpt):
    """fork, hold/extend and abort while a step is queued: the step in flight is read back
    first (or its row dropped), the outputs are the synchronous engine's."""
    path, cfg = ckpt
    a, b, c = token_prompts(3, cfg.vocab_size, seed=12)
    results = []
    for on in (False, True):
        llm = make_llm(path, show_progress=False, block_size=4, async_scheduling=on)
        ra = llm.add_request({"prompt_token_ids": a}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        rb = llm.add_request({"prompt_token_ids": b}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        rc = llm.add_request({"prompt_token_ids": c}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        finals, seen = {}, []
        for i in range(40):
            if i == 4:
                kids = llm.fork(ra, 2, SamplingParams(temperature=0.8, seed=9, max_tokens=6))
            if i == 6:
                assert llm.abort(rc)
            for o in llm.step():
                seen.append(o.request_id)
                if o.finished:
                    finals[o.request_id] = o
            if not llm.has_unfinished_requests():
                break
        assert not llm.has_unfinished_requests() and llm.block_manager.get_stats()["used"] == 0
        results.append({r: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for r, o in finals.items()})
        assert set(finals) >= {ra, rb, *kids} and rc not in finals
    assert results[1] == results[0]


def test_interrupted_async_step_is_recomputed(ckpt, monkeypatch):
    """A KeyboardInterrupt while a step is queued and the last one is being read back:
    both steps' sequences are requeued and recomputed; the final tokens are unchanged."""
    path, cfg = ckpt
    prompts = token_prompts(2, cfg.vocab_size, seed=13)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = make_llm(path, show_progress=False).generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                        use_tqdm=False)
    llm = make_llm(path, show_progress=False, async_scheduling=True)
    for p in prompts:
        llm.add_request({"prompt_token_ids": p}, sp)
    for _ in range(4):
        llm.step()
    assert llm.core.inflight is not None
    batch, pending = llm.core.inflight
    real = type(pending).wait

    def interrupted(self):
        monkeypatch.setattr(type(pending), "wait", real)
        raise KeyboardInterrupt
    monkeypatch.setattr(type(pending), "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.step()
    assert llm.core.inflight is None and all(s.num_pending == 0 for s in batch.seqs)
    finals = {}
    while llm.has_unfinished_requests():
        finals.update((o.request_id, o) for o in llm.step() if o.finished)
    assert [finals[r].outputs[0].token_ids for r in sorted(finals, key=int)] == [o.outputs[0].token_ids
                                                                                for o in want]


def test_the_flag():
    from engine.request_validation import check_engine_args
    with pytest.raises(ValueError, match="async_scheduling"):
        check_engine_args(model="m", tokenizer=None, download_dir=None, max_num_seqs=1, block_size=16,
                          num_kv_blocks=None, max_model_len=None, max_num_batched_tokens=None, seed=0,
                          enable_prefix_caching=True, skip_tokenizer_init=False, show_progress=False,
                          enforce_eager=False, gpu_memory_utilization=0.9, prefill_graph_max_tokens=512,
                          async_scheduling="yes")


def test_fork_n_hold_extend_and_beam_search(ckpt):
    """The decoding primitives on an async-scheduling engine (steps queued between them)
    give the synchronous engine's tokens."""
    from engine import BeamSearchParams
    from tests.helpers import finish_all
    path, cfg = ckpt
    [p] = token_prompts(1, cfg.vocab_size, seed=21)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = []
    for on in (False, True):
        llm = make_llm(path, show_progress=False, block_size=4, async_scheduling=on)
        n = llm.generate([{"prompt_token_ids": p}], SamplingParams(n=2, temperature=0.8, seed=4, max_tokens=20),
                         use_tqdm=False)[0]
        rid = llm.add_request({"prompt_token_ids": p}, greedy)
        for _ in range(4):
            llm.step()
        kid = llm.fork(rid)[0]
        forked = finish_all(llm)
        held = llm.add_request({"prompt_token_ids": p}, SamplingParams(max_tokens=3, hold=True, temperature=0,
                                                                      ignore_eos=True))
        first = finish_all(llm)[held].outputs[0].token_ids
        llm.extend(held, [21, 22, 23], greedy)
        extended = finish_all(llm)[held].outputs[0].token_ids
        beams = llm.beam_search([{"prompt_token_ids": p}], BeamSearchParams(beam_width=2, max_tokens=8))[0]
        results.append(([c.token_ids for c in n.outputs], forked[rid].outputs[0].token_ids,
                        forked[kid].outputs[0].token_ids, first, extended, [s.tokens for s in beams.sequences]))
        assert llm.block_manager.get_stats()["used"] == 0 and not llm.has_unfinished_requests()
    assert results[1] == results[0]
    assert llm.scheduling_stats["overlapped"] > 10


class _AfterFiveOnlySeven:
    """A toy grammar processor: after token 5, only 7 may follow (then anything again).
    Offers its tables, so async scheduling runs it on the device."""

    def __init__(self, V):
        self.V = V

    def _state(self, out):
        return 1 if out and out[-1] == 5 else 0

    def __call__(self, logits, request_ids, output_token_ids):
        for i, out in enumerate(output_token_ids):
            if self._state(out):
                keep = logits[i, 7].clone()
                logits[i] = float("-inf")
                logits[i, 7] = keep
        return logits

    def grammar_tables(self, device):
        forbidden = torch.zeros(2, self.V, dtype=torch.bool)
        forbidden[1] = True
        forbidden[1, 7] = False
        nxt = torch.zeros(2, self.V, dtype=torch.long)
        nxt[:, 5] = 1
        return forbidden.to(device), nxt.to(device)

    def grammar_state(self, request_id, output_token_ids):
        return self._state(output_token_ids)


def test_grammar_processors_run_on_the_device_and_overlap(ckpt):
    """A processor offering its grammar's tables does not make steps synchronous: the
    step queued ahead masks its rows from the tables and the pending token on the
    device, with the host-side call's result; rows without processors beside them."""
    path, cfg = ckpt
    prompts = token_prompts(4, cfg.vocab_size, seed=23)
    proc = _AfterFiveOnlySeven(cfg.vocab_size)

    def favour_five(token_ids, logits):          # makes 5 frequent, so the grammar bites
        return logits
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, logits_processors=[proc]) for s in (1, 2)]
    params += [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logits_processors=[proc]),
               SamplingParams(temperature=0.9, seed=3, max_tokens=25)]
    sync, async_, llm = _both(path, prompts, params)
    _assert_same(sync, async_)
    toks = [t for o in sync for c in o.outputs for t in c.token_ids]
    assert 5 in toks and all(b == 7 for a, b in zip(toks, toks[1:]) if a == 5)
    stats = llm.scheduling_stats
    assert "host-side sampling" not in stats["sync"] and stats["overlapped"] >= 20


def test_self_rag_answers_overlap_with_async_scheduling():
    """Self-RAG's ReflectionConstraint offers its tables: its answers are identical with
    async scheduling, and their decode steps are queued ahead."""
    from engine import LLM
    from selfrag import Passage, SelfRAG
    from selfrag.default_model import default_model_dir
    passages = [Passage("Alpaca", "Alpacas were bred specifically for their fiber."),
                Passage("Llama", "Llamas are used as pack animals.")]
    got = []
    for on in (False, True):
        rag = SelfRAG(LLM(default_model_dir(), show_progress=False, async_scheduling=on))
        a = rag.answer("What were alpacas bred for?", passages=passages, mode="always", max_tokens=40)
        b = rag.answer("Tell me about llamas.", mode="never", max_tokens=30, passages=[])
        got.append(([c.token_ids for c in a.candidates], a.answer, [c.token_ids for c in b.candidates], b.answer))
        stats = rag.llm.scheduling_stats
    assert got[1] == got[0]
    assert stats["overlapped"] >= 10, stats
