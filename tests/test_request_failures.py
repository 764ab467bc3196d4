"""A failing request never stalls the others; the engine's own failure is fatal, and
says so on every later call; nothing a caller did not consume is lost.

The failing request's processor passes through for a few calls and then misbehaves
(raises, returns a wrong shape / dtype / non-tensor, NaN, or masks every token). The
healthy requests must give exactly the tokens they give alone, the failed one must
end with finish_reason "error" and an error naming it, and every KV block must come
back."""
import math

import pytest
import torch

from engine import EngineDeadError, RequestFailedError, SamplingParams
from tests.helpers import make_checkpoint, make_llm, token_prompts

CASES = {
    "raises": (lambda x: (_ for _ in ()).throw(RuntimeError("kaput")), "raised RuntimeError: kaput"),
    "shape": (lambda x: x[:, :-1], "returned shape"),
    "dtype": (lambda x: x.long(), "returned dtype torch.int64"),
    "not a tensor": (lambda x: None, "returned NoneType"),
    "nan": (lambda x: x * math.nan, "NaN"),
    "all masked": (lambda x: torch.full_like(x, -math.inf), "masked every token"),
}


class FailsAt:
    """Passes the logits through until call ``at``, then does ``bad``."""

    def __init__(self, at: int, bad):
        self.at, self.bad, self.calls = at, bad, 0

    def __call__(self, logits, request_ids, output_ids):
        self.calls += 1
        return self.bad(logits) if self.calls >= self.at else logits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("failures")
    cfg = make_checkpoint(path, num_key_value_heads=2)
    return str(path), cfg


def _solo(path, prompt, sp):
    return make_llm(path, show_progress=False).generate([{"prompt_token_ids": prompt}], sp,
                                                        use_tqdm=False)[0].outputs[0].token_ids


def _run_all(llm, finals):
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                assert out.request_id not in finals          # delivered once
                finals[out.request_id] = out


@pytest.mark.parametrize("async_output", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_a_failing_request_ends_alone(ckpt, case, async_output):
    """B fails at its second step (a decode step, A decoding beside it); C is queued
    after the failure and prefilled while A decodes."""
    path, cfg = ckpt
    bad, message = CASES[case]
    a, b, c = token_prompts(3, cfg.vocab_size, seed=11)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = make_llm(path, show_progress=False)
    llm.async_output = async_output
    ra = llm.add_request({"prompt_token_ids": a}, sp)
    rb = llm.add_request({"prompt_token_ids": b}, SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, logits_processors=[FailsAt(2, bad)]))
    finals = {}
    for _ in range(3):
        for out in llm.step():
            if out.finished:
                finals[out.request_id] = out
    rc = llm.add_request({"prompt_token_ids": c}, sp)
    _run_all(llm, finals)
    fb = finals[rb]
    assert fb.outputs[0].finish_reason == "error" and fb.finished
    assert f"request {rb!r} failed" in fb.error and message in fb.error, fb.error
    assert "FailsAt" in fb.error or case in ("nan", "all masked")
    assert len(fb.outputs[0].token_ids) == 1                 # the first step's token only
    assert finals[ra].error is None and finals[ra].outputs[0].token_ids == _solo(path, a, sp)
    assert finals[rc].outputs[0].token_ids == _solo(path, c, sp)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_a_failure_in_a_prefill_step_while_others_decode(ckpt):
    path, cfg = ckpt
    a, b = token_prompts(2, cfg.vocab_size, seed=12)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm = make_llm(path, show_progress=False)
    ra = llm.add_request({"prompt_token_ids": a}, sp)
    for _ in range(3):
        llm.step()                                           # A prefilled and decoding
    rb = llm.add_request({"prompt_token_ids": b}, SamplingParams(
        max_tokens=5, logits_processors=[FailsAt(1, CASES["raises"][0])]))
    finals = {}
    _run_all(llm, finals)
    assert finals[rb].outputs[0].finish_reason == "error" and finals[rb].outputs[0].token_ids == []
    assert finals[ra].outputs[0].token_ids == _solo(path, a, sp)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_generate_returns_the_errored_output_and_stream_raises(ckpt):
    path, cfg = ckpt
    a, b = token_prompts(2, cfg.vocab_size, seed=13)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    failing = SamplingParams(temperature=0, max_tokens=6, logits_processors=[FailsAt(3, CASES["nan"][0])])
    llm = make_llm(path, show_progress=False)
    outs = llm.generate([{"prompt_token_ids": a}, {"prompt_token_ids": b}], [sp, failing], use_tqdm=False)
    assert outs[0].error is None and outs[0].outputs[0].token_ids == _solo(path, a, sp)
    assert outs[1].outputs[0].finish_reason == "error" and "NaN" in outs[1].error
    failing.logits_processors[0].calls = 0
    with pytest.raises(RequestFailedError, match="NaN") as e:
        list(llm.stream({"prompt_token_ids": b}, failing))
    assert isinstance(e.value, ValueError)                   # an InvalidRequestError
    assert not llm.has_unfinished_requests()
    assert llm.generate([{"prompt_token_ids": a}], sp, use_tqdm=False)[0].outputs[0].token_ids == \
        outs[0].outputs[0].token_ids                         # the engine goes on


def test_the_engines_own_failure_is_fatal_and_says_so(ckpt, monkeypatch):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False)
    rid = llm.add_request({"prompt_token_ids": [1, 5, 6]}, SamplingParams(max_tokens=3))

    def broken(*a, **k):
        raise RuntimeError("device lost")
    monkeypatch.setattr(llm.model, "forward", broken)
    with pytest.raises(EngineDeadError, match="device lost") as e:
        llm.step()
    assert isinstance(e.value.__cause__, RuntimeError)
    monkeypatch.undo()                                       # even a working forward: still dead
    for call in (llm.step, lambda: llm.add_request("x" if llm.tokenizer else {"prompt_token_ids": [1]}),
                 lambda: llm.generate([{"prompt_token_ids": [1, 2]}], use_tqdm=False),
                 lambda: next(llm.stream({"prompt_token_ids": [1, 2]}))):
        with pytest.raises(EngineDeadError, match="device lost"):
            call()
    assert llm.engine_error is not None and llm.abort(rid)  # cleanup still works


def test_an_interrupted_step_is_recomputed_and_leaves_no_unwritten_cached_blocks(ckpt, monkeypatch):
    path, cfg = ckpt
    llm = make_llm(path, show_progress=False, block_size=8)
    prompt = {"prompt_token_ids": list(range(1, 30))}      # 3 full blocks get cached at allocation
    real = llm.model.forward

    def interrupt_once(*a, **k):
        monkeypatch.setattr(llm.model, "forward", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.model, "forward", interrupt_once)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompt, sp, use_tqdm=False)
    assert llm.engine_error is None
    # Those blocks' KV was never written: the same prompt must not reuse them.
    [o] = llm.generate(prompt, sp, use_tqdm=False)
    assert o.outputs[0].token_ids == _solo(path, prompt["prompt_token_ids"], sp)


@pytest.mark.parametrize("caller", ["generate", "stream"])
def test_outputs_of_other_requests_are_kept_for_the_next_step(ckpt, caller):
    """generate()/stream() step the whole engine: a request added with add_request that
    finishes meanwhile is returned by the next step(), not dropped."""
    path, cfg = ckpt
    a, b = token_prompts(2, cfg.vocab_size, seed=14)
    llm = make_llm(path, show_progress=False)
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    ra = llm.add_request({"prompt_token_ids": a}, short)
    long = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    if caller == "generate":
        llm.generate([{"prompt_token_ids": b}], long, use_tqdm=False)
    else:
        assert "".join(llm.stream({"prompt_token_ids": b}, long)) is not None
    assert not llm.has_unfinished_requests()
    outs = llm.step()
    assert [o.request_id for o in outs] == [ra] and outs[0].finished
    assert outs[0].outputs[0].token_ids == _solo(path, a, short)
    assert llm.step() == []                                  # delivered once
