"""The sampling knobs (engine/sampling/knobs.py) against independent references: HF
transformers' own logits processors in a plain HF greedy loop where the semantics match
(repetition penalty, logit bias), and hand-written loops over HF's logits elsewhere
(OpenAI's presence/frequency penalties, vLLM's min_tokens with stop ids, min_p)."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.sampling_params import SamplingParamsError
from tests.helpers import hf_model, make_checkpoint, make_llm, token_prompts

NEW = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("knobs")
    # std 0.3: peaked enough that greedy repeats tokens, so the penalties change picks
    cfg = make_checkpoint(path, num_key_value_heads=2, std=0.3)
    return str(path), cfg, hf_model(path)


@torch.no_grad()
def hf_loop(model, prompt, new, adjust):
    """Greedy over HF's raw logits after ``adjust(ids_so_far [1, L], out_ids, logits [1, V])``.
    Returns (tokens, raw log-softmax rows)."""
    ids = torch.tensor([prompt])
    tokens, rows = [], []
    for _ in range(new):
        logits = model(ids).logits[:, -1].float()
        rows.append(torch.log_softmax(logits[0], -1))
        scores = adjust(ids, tokens, logits.clone())
        t = int(scores[0].argmax())
        tokens.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return tokens, rows


def engine_tokens(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_hf_processor(ckpt, penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    path, cfg, hf = ckpt
    prompts = token_prompts(3, cfg.vocab_size, seed=5)
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    llm = make_llm(path, show_progress=False)
    outs = engine_tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True,
                                                     repetition_penalty=penalty, logprobs=0))
    plain = engine_tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    for p, o, q in zip(prompts, outs, plain):
        ref, rows = hf_loop(hf, p, NEW, lambda ids, out, s: proc(ids, s))
        assert o.token_ids == ref
        # log-probs stay raw: HF's log-softmax before the penalty
        for step, (t, row) in enumerate(zip(ref, rows)):
            assert o.logprobs[step][t].logprob == pytest.approx(float(row[t]), abs=1e-4)
    assert any(o.token_ids != q.token_ids for o, q in zip(outs, plain))      # the knob did something


def test_logit_bias_equals_hf_sequence_bias(ckpt):
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor
    path, cfg, hf = ckpt
    prompts = token_prompts(2, cfg.vocab_size, seed=8)
    llm = make_llm(path, show_progress=False)
    first = engine_tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    bias = {first[0].token_ids[0]: -100.0, 7: 6.5, 11: 3.0, first[1].token_ids[2]: -4.0}
    proc = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
    outs = engine_tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True,
                                                     logit_bias=bias))
    for p, o in zip(prompts, outs):
        ref, _ = hf_loop(hf, p, NEW, lambda ids, out, s: proc(ids, s))
        assert o.token_ids == ref
    assert outs[0].token_ids[0] != first[0].token_ids[0]


@pytest.mark.parametrize("presence,frequency", [(0.8, 0.0), (0.0, 0.6), (1.5, -0.5)])
def test_openai_penalties_by_hand(ckpt, presence, frequency):
    path, cfg, hf = ckpt
    prompts = token_prompts(2, cfg.vocab_size, seed=13)
    llm = make_llm(path, show_progress=False)

    def openai(ids, out, s):            # OpenAI's definition, output tokens only
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=s.shape[1]).float()
        return s - frequency * counts - presence * (counts > 0).float()
    outs = engine_tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True,
                                                     presence_penalty=presence, frequency_penalty=frequency))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_loop(hf, p, NEW, openai)[0]


def test_min_tokens_masks_eos_and_stop_ids_by_hand(ckpt):
    path, cfg, hf = ckpt
    prompt = token_prompts(1, cfg.vocab_size, seed=21)[0]
    llm = make_llm(path, show_progress=False)
    plain = engine_tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    eos = llm.eos_token_id
    m = 9

    def vllm_rule(stops):
        def adjust(ids, out, s):
            if len(out) < m:
                s[0, stops + [eos]] = float("-inf")
            return s
        return adjust
    early = sorted(set(plain.token_ids[:4]))          # ids greedy wants early: the mask must bite
    first, _ = hf_loop(hf, prompt, 30, vllm_rule(early))
    stops = sorted(set(early) | {first[m]})           # and one the masked run picks at step m
    ref, _ = hf_loop(hf, prompt, 30, vllm_rule(stops))
    [o] = engine_tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=stops,
                                                      min_tokens=m))
    end = next(i for i, t in enumerate(ref) if t in stops or t == eos)
    assert end >= m and o.token_ids == ref[:end + 1] and o.finish_reason == "stop"


def test_min_p_one_keeps_only_the_top_token(ckpt):
    path, cfg, hf = ckpt
    prompts = token_prompts(3, cfg.vocab_size, seed=4)
    llm = make_llm(path, show_progress=False)
    greedy = engine_tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    sampled = engine_tokens(llm, prompts, SamplingParams(temperature=1.5, min_p=1.0, max_tokens=10,
                                                         ignore_eos=True, seed=3))
    assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]


def test_mixed_batch_and_preemption_give_solo_tokens(ckpt):
    path, cfg, _ = ckpt
    prompts = token_prompts(6, cfg.vocab_size, seed=30, min_len=10, max_len=30)
    kinds = [SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, repetition_penalty=1.4),
             SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, presence_penalty=1.0,
                            frequency_penalty=0.5, logit_bias={5: 2.0})]
    params = [kinds[i % 3] for i in range(len(prompts))]
    solo_llm = make_llm(path, show_progress=False)
    solo = [engine_tokens(solo_llm, [p], k)[0].token_ids for p, k in zip(prompts, params)]
    llm = make_llm(path, show_progress=False)
    assert [o.token_ids for o in engine_tokens(llm, prompts, params)] == solo
    tight = make_llm(path, show_progress=False, block_size=8, num_kv_blocks=14, max_model_len=64)
    assert [o.token_ids for o in engine_tokens(tight, prompts, params)] == solo
    assert tight.scheduler.num_preemptions > 0


@pytest.mark.parametrize("kw,match", [
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "must be <= max_tokens"), (dict(min_p=1.5), "min_p"),
    (dict(logit_bias={3: 101}), "bias 101"), (dict(logit_bias={-1: 1}), "key -1"),
    (dict(logit_bias=[1, 2]), "must be a dict"),
])
def test_bad_values_are_named(kw, match):
    with pytest.raises(SamplingParamsError, match=match):
        SamplingParams(**kw)


def test_logit_bias_ids_checked_against_the_vocab(ckpt):
    path, cfg, _ = ckpt
    llm = make_llm(path, show_progress=False)
    with pytest.raises(ValueError, match="logit_bias has ids"):
        llm.generate({"prompt_token_ids": [1, 5]}, SamplingParams(logit_bias={cfg.vocab_size: 1.0}),
                     use_tqdm=False)
    assert SamplingParams(logit_bias={"12": 1}).logit_bias == {12: 1.0}      # JSON-style keys


def test_bad_words_equal_hf_no_bad_words_on_the_miniature_model():
    """A trained model about to write "capital": banned, it writes something else, exactly
    as HF's NoBadWordsLogitsProcessor does with the same token lists (taken here from HF's
    own tokenizer: the word alone and after a space)."""
    from transformers import AutoTokenizer
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    from selfrag.default_model import default_model_dir
    from selfrag.prompts import format_passage, format_prompt
    from selfrag.types import Passage
    path = default_model_dir()
    hf_tok = AutoTokenizer.from_pretrained(path)
    text = format_prompt("What is the capital of Disir?") + format_passage(
        Passage(title="Disir", text="Polon is the capital city of Disir. In Disir, most people speak Lorese."))
    prompt = hf_tok.encode(text)
    llm = make_llm(path, show_progress=False)
    free = engine_tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=20))[0]
    assert "capital" in free.text
    ids = [hf_tok.encode(w, add_special_tokens=False) for w in ("capital", " capital")]
    ids = [x for i, x in enumerate(ids) if x not in ids[:i]]
    proc = NoBadWordsLogitsProcessor(ids, eos_token_id=hf_tok.eos_token_id)
    [o] = engine_tokens(llm, [prompt], SamplingParams(temperature=0, max_tokens=20, bad_words=["capital"]))
    ref, _ = hf_loop(hf_model(path), prompt, len(o.token_ids), lambda i, out, s: proc(i, s))
    assert o.token_ids == ref and o.token_ids != free.token_ids
    # the banned spellings never occur (another split of the same letters could: vLLM
    # and HF ban token sequences, not text; the model writes "Polon" as P+ol+on, not the
    # canonical Pol+on, so banning "Polon" would not bite)
    assert not any(o.token_ids[i:i + len(x)] == x for x in ids for i in range(len(o.token_ids)))
    assert sorted(SamplingParams(bad_words=["Polon"]).bad_words) == ["Polon"]
    with pytest.raises(ValueError, match="bad_words needs a tokenizer"):
        make_llm(path, show_progress=False, skip_tokenizer_init=True).generate(
            {"prompt_token_ids": prompt}, SamplingParams(bad_words=["x"]), use_tqdm=False)


def test_include_stop_str_in_output_keeps_the_match_and_streams_without_holding_back():
    from engine import LLM
    from selfrag.default_model import default_model_dir
    from selfrag.prompts import format_passage, format_prompt
    from selfrag.types import Passage
    llm = LLM(default_model_dir(), device="cpu", show_progress=False)
    prompt = format_prompt("What is the capital of Disir?") + format_passage(
        Passage(title="Disir", text="Polon is the capital city of Disir. In Disir, most people speak Lorese."))
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0].text
    stop = "is the"                     # two tokens: after "is", the text may be a stop's start
    cut = free.index(stop)

    def run(include):
        seen = []
        rid = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop],
                                                     include_stop_str_in_output=include))
        while True:
            outs = [o for o in llm.step() if o.request_id == rid]
            if outs:
                seen.append(outs[-1].outputs[0].text)
                if outs[-1].finished:
                    return outs[-1].outputs[0], seen
    dropped, seen_dropped = run(False)
    kept, seen_kept = run(True)
    assert dropped.text == free[:cut] and kept.text == free[:cut + len(stop)]
    assert kept.stop_reason == stop and kept.finish_reason == "stop"
    for final, seen in ((dropped, seen_dropped), (kept, seen_kept)):
        assert all(final.text.startswith(t) for t in seen)            # never taken back
    # "...Polon is": held back by default (it may be the stop's start), sent at once when kept
    assert any(t.endswith(" is") for t in seen_kept[:-1])
    assert not any(t.endswith(" is") for t in seen_dropped)


def test_vllm_per_request_processors_by_hand(ckpt):
    from engine.sampling.logits_processors import per_request, processor_form
    path, cfg, hf = ckpt
    prompts = token_prompts(2, cfg.vocab_size, seed=40)
    llm = make_llm(path, show_progress=False)
    plain = engine_tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    banned = plain[0].token_ids[4]

    def ban_after_three(output_ids, logits):              # vLLM's two-argument form
        if len(output_ids) >= 3:
            logits[banned] = float("-inf")
        return logits

    def favour_prompt_start(prompt_tokens_ids, past_tokens_ids, logits):   # vLLM's three-argument form
        logits[prompt_tokens_ids[1]] += 0.5 * len(past_tokens_ids)
        return logits

    def batched_push(logits, request_ids, output_token_ids):    # ours; runs first
        logits[:, banned] += 100.0
        return logits
    assert [processor_form(p) for p in (ban_after_three, favour_prompt_start, batched_push)] == \
        ["row", "row_with_prompt", "batched"]
    assert processor_form(per_request(lambda a, b, c: c, with_prompt=True)) == "row_with_prompt"
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            logits_processors=[favour_prompt_start, ban_after_three, batched_push])
    outs = engine_tokens(llm, prompts, params)
    for p, o in zip(prompts, outs):
        def by_hand(ids, out, s):
            s[0, banned] += 100.0                           # the batched one first
            s[0, p[1]] += 0.5 * len(out)                    # then the row ones, in list order
            if len(out) >= 3:
                s[0, banned] = float("-inf")
            return s
        assert o.token_ids == hf_loop(hf, p, 12, by_hand)[0]
        assert banned not in o.token_ids[3:]


def test_a_failing_per_request_processor_fails_only_its_row(ckpt):
    path, cfg, _ = ckpt
    prompts = token_prompts(2, cfg.vocab_size, seed=41)
    llm = make_llm(path, show_progress=False)

    def broken(output_ids, logits):
        return logits[:5]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(temperature=0, max_tokens=4, logits_processors=[broken]),
                         SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "broken" in outs[0].error
    assert "returned shape (5,)" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length" and len(outs[1].outputs[0].token_ids) == 4


def dense_knobs(logits, seq, eos_id):
    """The knobs of one row by hand, densely over the vocabulary, in the documented order."""
    p, x = seq.params, logits.clone()
    out, n_out = seq.output_token_ids, seq.num_generated_tokens
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for ids in p.bad_words_token_ids or ():
        if len(ids) == 1 or (n_out >= len(ids) - 1 and out[len(out) - len(ids) + 1:] == ids[:-1]):
            x[ids[-1]] = float("-inf")
    if n_out < p.min_tokens:
        for t in list(p.stop_token_ids or ()) + ([] if p.ignore_eos else [eos_id]):
            x[t] = float("-inf")
    for t in set(seq.token_ids):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    return x


class _DoneEvent:
    def record(self):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


@pytest.mark.parametrize("staged", [False, True])
def test_apply_knobs_equals_a_dense_reference_step_by_step_and_restores_the_raw_logits(staged):
    """A batch mixing rows with and without knobs, over steps that switch min_tokens' mask
    off, match and unmatch a two-token bad word, repeat tokens, emit a row's pad token and
    outgrow the batch's working copy; then a fork continues with a copy of its parent's
    state, in a new batch. ``staged``: every host array goes through the packed staging
    buffers as on CUDA (a clone stands in for the copy)."""
    from engine.core.sequence import Sequence
    from engine.sampling.knobs import KnobState, apply_knobs, restore, uses_knobs
    from engine.utils.host_to_device import HostToDevice
    V, eos = 50, 2
    knobs = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25,
                           min_tokens=2, stop_token_ids=[9], logit_bias={5: 1.5, 0: -2.0})
    knobs.bad_words_token_ids = [[7], [11, 12], [0, 3, 4]]
    seqs = [Sequence([1, 5, 5, 8], "a", knobs), Sequence([3, 4], "plain", SamplingParams()),
            Sequence([0, 12, 13], "b", SamplingParams(repetition_penalty=0.8, logit_bias={13: -1.0})),
            Sequence(list(range(2, 32)), "c", SamplingParams(frequency_penalty=0.5))]
    state = KnobState(torch.device("cpu"))
    if staged:
        state.upload = HostToDevice("cpu", staged=True, copy=lambda src: src.clone(), make_event=_DoneEvent)
    gen = torch.Generator().manual_seed(3)
    rows = [i for i, s in enumerate(seqs) if uses_knobs(s.params)]
    # row c: 30 columns; then 0 and 1 (its pad token, twice over) and new tokens that
    # outgrow its batch's 32-column working copy
    outputs = [[11, 5, 0, 11, 12, 3, 11], [4, 4, 4, 4, 4, 4, 4], [12, 0, 0, 30, 12, 13, 1],
               [0, 1, 40, 41, 42, 0, 43]]
    for step in range(len(outputs[0]) + 1):
        raw = torch.randn(len(seqs), V, generator=gen) * 2
        logits = raw.clone()
        undo = apply_knobs(logits, seqs, rows, state, eos, keep_raw=True)
        for i, s in enumerate(seqs):
            want = dense_knobs(raw[i], s, eos) if i in rows else raw[i]
            assert torch.equal(logits[i], want), (step, i)
        restore(logits, undo)
        assert torch.equal(logits, raw)
        if step < len(outputs[0]):
            for s, out in zip(seqs, outputs):
                s.token_ids.append(out[step])
    child = Sequence(list(seqs[0].token_ids), "a-child", knobs)
    child.num_prompt_tokens = seqs[0].num_prompt_tokens
    state.fork(seqs[0], child)
    child.token_ids += [12, 13]        # the parent ends with 11 ([11, 12] banned), the child not
    batch = [child, seqs[0]]
    raw = torch.randn(2, V, generator=gen)
    logits = raw.clone()
    apply_knobs(logits, batch, [0, 1], state, eos)
    assert torch.equal(logits[0], dense_knobs(raw[0], child, eos))
    assert torch.equal(logits[1], dense_knobs(raw[1], seqs[0], eos))
    assert logits[0, 12] != float("-inf") and logits[1, 12] == float("-inf")
    assert state.upload.num_copies > 0 if staged else state.upload.num_copies == 0


def test_knob_rows_are_reused_after_finish():
    from engine.core.sequence import Sequence, SequenceStatus
    from engine.sampling.knobs import KnobState
    state = KnobState(torch.device("cpu"))
    p = SamplingParams(repetition_penalty=1.2)
    first = [Sequence([1, 2, 3], f"a{i}", p) for i in range(3)]
    state.update(first)
    size = state.cols.shape[0]
    for seq in first:
        seq.status = SequenceStatus.FINISHED
    for i in range(3 * size):          # many later requests, one at a time: rows are reused
        seq = Sequence([5, 6], f"n{i}", p)
        (row,), width = state.update([seq])
        assert width == 2 and state.cols[row, :2, 0].tolist() == [5, 6]
        seq.status = SequenceStatus.FINISHED
    assert state.cols.shape[0] == size


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa_tied", "sharded_v5", "linear_rope_v4",
                                     "head_dim_32_blocks_ragged"])
def test_all_knobs_together_on_every_parity_checkpoint(tmp_path, variant):
    """Repetition penalty (HF's processor), a logit bias (HF's), and OpenAI's penalties
    (by hand) at once, in that order, on each parity checkpoint shape."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    from tests.test_engine_parity import VARIANTS
    cfg = make_checkpoint(tmp_path, std=0.3, **VARIANTS[variant])
    prompts = token_prompts(2, cfg.vocab_size, seed=len(variant))
    bias = {3: 4.0, 17: -3.0, 42: 2.5}
    rep_proc = RepetitionPenaltyLogitsProcessor(1.25)
    bias_proc = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])

    def reference(ids, out, s):
        s = rep_proc(ids, bias_proc(ids, s))             # bias first, then the repetition rule
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=s.shape[1]).float()
        return s - 0.4 * counts - 0.7 * (counts > 0).float()
    llm = make_llm(str(tmp_path), show_progress=False, block_size=8)
    outs = engine_tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                     repetition_penalty=1.25, logit_bias=bias,
                                                     presence_penalty=0.7, frequency_penalty=0.4))
    hf = hf_model(tmp_path)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_loop(hf, p, 16, reference)[0]


def test_strict_ranks_count_larger_entries_with_ties_and_repeated_ids():
    """The rank of each requested value: 1 + entries strictly larger, counted by hand."""
    from engine.sampling.sampler import strict_ranks
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 0.5],
                           [3.0, -float("inf"), 1.0, 1.0, 0.0]])
    vals = torch.tensor([[2.0, 0.5, -1.0, 0.5],
                         [-float("inf"), 3.0, 1.0, 0.0]])
    expected = torch.tensor([[1, 3, 5, 3],
                             [5, 1, 2, 4]])
    assert torch.equal(strict_ranks(logits, vals), expected)
    g = torch.Generator().manual_seed(0)                 # and the broadcast form on odd shapes
    x = torch.randn(7, 1001, generator=g).round(decimals=1)
    v = x[:, torch.randint(0, 1001, (13,), generator=g)]
    assert torch.equal(strict_ranks(x, v), (x.unsqueeze(1) > v.unsqueeze(2)).sum(-1) + 1)
