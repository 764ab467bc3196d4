"""Async output processing (on by default on CUDA): a step's text and stop-string
checks run while the next step computes. It must change nothing users see."""
import pytest

from engine import SamplingParams
from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
from selfrag.default_tokenizer import build_tokenizer
from tests.helpers import make_checkpoint, make_llm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("asyncmodel")
    build_tokenizer(str(path), vocab_size=600)
    make_checkpoint(path, vocab_size=len(Tokenizer.from_pretrained(str(path))), num_key_value_heads=2,
                    max_position_embeddings=256)
    return str(path)


def _requests(llm):
    prompts = ["Alpacas live in", "The llama is", "Camelids of the Andes", "One two three"]
    free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)
    stop = [o.outputs[0].text[6:9] for o in free]     # stop strings that really occur
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop[0]]),
              SamplingParams(temperature=0, max_tokens=7, logprobs=2),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop[2]],
                             stop_token_ids=[5]),
              SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True)]
    return prompts, params


def _view(outs):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
             o.outputs[0].stop_reason,
             # batch composition differs by a step around late stop strings: fp32 noise
             round(o.outputs[0].cumulative_logprob, 3),
             None if o.outputs[0].logprobs is None else len(o.outputs[0].logprobs)) for o in outs]


def test_async_output_changes_nothing(model_dir):
    sync = make_llm(model_dir, show_progress=False)
    prompts, params = _requests(sync)
    want = _view(sync.generate(prompts, params, use_tqdm=False))
    assert any(w[2] == "stop" and isinstance(w[3], str) for w in want)   # a stop string fired
    fast = make_llm(model_dir, show_progress=False)
    fast.async_output = True
    got = _view(fast.generate(prompts, params, use_tqdm=False))
    assert got == want
    assert fast.block_manager.num_free_blocks == fast.block_manager.num_blocks
    deltas = "".join(fast.stream(prompts[0], params[0]))
    assert deltas == want[0][1]


def test_async_step_api_delivers_every_output_once(model_dir):
    llm = make_llm(model_dir, show_progress=False)
    llm.async_output = True
    prompts, params = _requests(llm)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        llm.add_request(p, sp, request_id=f"r{i}")
    finished = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                assert out.request_id not in finished
                finished[out.request_id] = out
    for _ in range(2):
        for out in llm.step():                       # idle steps flush, never duplicate
            assert not out.finished
    assert sorted(finished) == ["r0", "r1", "r2", "r3"]


def test_generated_token_count_is_not_delayed(model_dir):
    """Async output delivers a step's text one step late; LLM.num_generated_tokens (what
    the benchmarks read time to first token from) counts the token at once."""
    llm = make_llm(model_dir, show_progress=False)
    llm.async_output = True
    rid = llm.add_request("The llama is", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert llm.num_generated_tokens(rid) == 0
    assert llm.step() == []                         # the prefill sampled a token; its output waits
    assert llm.num_generated_tokens(rid) == 1
    outs = llm.step()                               # the text of token 1, while token 2 is sampled
    assert llm.num_generated_tokens(rid) == 2 and len(outs[0].outputs[0].token_ids) == 1
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.num_generated_tokens(rid) is None    # finished: no longer running
