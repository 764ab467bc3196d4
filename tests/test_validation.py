"""Every bad value is a clear ValueError naming the parameter and the value; numpy
integers are integers; vLLM-only arguments are refused or (harmless ones) accepted
with one warning; a checkpoint with tokenizer files but no tokenizer.model says so."""
import json
import math
import warnings

import numpy as np
import pytest

from engine import CheckpointError, InvalidRequestError, SamplingParams, SamplingParamsError, request_validation
from tests.helpers import make_checkpoint, make_llm

BAD_PARAMS = [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.5), ("temperature", "0"),
    ("temperature", True), ("top_p", 0.0), ("top_p", math.nan), ("top_p", 1.5), ("top_k", 0),
    ("top_k", 2.0), ("top_k", True), ("max_tokens", True), ("max_tokens", 0), ("max_tokens", 3.0),
    ("seed", False), ("seed", 1.5), ("logprobs", True), ("logprobs", -1), ("n", 0), ("n", True),
    ("stop", 123), ("stop", [""]), ("stop", ["ok", 5]), ("stop_token_ids", 5), ("stop_token_ids", "12"),
    ("stop_token_ids", [True]), ("stop_token_ids", [-1]), ("logprob_token_ids", [1.0]),
    ("logits_processors", print), ("logits_processors", [1]), ("logits_processors", "f"),
    ("ignore_eos", 1), ("skip_special_tokens", None),
]


@pytest.mark.parametrize("name,value", BAD_PARAMS, ids=[f"{n}={v!r}" for n, v in BAD_PARAMS])
def test_bad_sampling_params_name_the_field_and_value(name, value):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{name: value})
    assert isinstance(e.value, ValueError)
    assert f"SamplingParams.{name}={value!r}" in str(e.value)


def test_numpy_integers_are_integers():
    sp = SamplingParams(seed=np.int64(3), max_tokens=np.int32(4), top_k=np.int16(5), logprobs=np.uint8(2),
                        stop_token_ids=np.array([7, 8]), logprob_token_ids=[np.int64(9)])
    assert (sp.seed, sp.max_tokens, sp.top_k, sp.logprobs) == (3, 4, 5, 2)
    assert sp.stop_token_ids == [7, 8] and sp.logprob_token_ids == [9]
    assert all(type(x) is int for x in [sp.seed, sp.max_tokens, *sp.stop_token_ids])


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("validation")
    make_checkpoint(path)
    return make_llm(str(path), show_progress=False)


def test_numpy_prompt_token_ids_are_accepted(llm):
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = [1, 5, 9, 33]
    want = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0].outputs[0].token_ids
    for form in (np.array(ids), np.array(ids, dtype=np.int32), [np.int64(t) for t in ids], tuple(ids)):
        out = llm.generate([{"prompt_token_ids": form}], sp, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == want and out.prompt_token_ids == ids


@pytest.mark.parametrize("prompts,match", [
    (None, "prompts is None"), (123, "a prompt must be a str or a dict"),
    ([None], "a prompt must be a str or a dict, got NoneType"),
    ([{"prompt_token_ids": [1, 2], "images": []}], "unknown keys"),
    ([{"prompt_token_ids": np.ones((2, 2), dtype=np.int64)}], "1-D"),
    ([{"prompt_token_ids": [1, 2.0]}], r"ints in \[0, 320\)"),
    ([{"prompt_token_ids": [1, True]}], r"ints in \[0, 320\)"),
    ([{"prompt_token_ids": "12"}], "must be a list of token ids"),
    ([{"prompt_token_ids": [1], "prompt": 5}], "'prompt' must be a str"),
    ([{}], "needs 'prompt_token_ids' or 'prompt'"),
])
def test_bad_prompts_are_clear_errors(llm, prompts, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.has_unfinished_requests()


def test_bad_params_object(llm):
    with pytest.raises(InvalidRequestError, match="must be SamplingParams, got int"):
        llm.generate([{"prompt_token_ids": [1, 2]}], 123, use_tqdm=False)


@pytest.mark.parametrize("kw,match", [
    (dict(tensor_parallel_size=2), "tensor_parallel_size=2"),
    (dict(pipeline_parallel_size=4), "pipeline_parallel_size=4"),
    (dict(quantization="awq"), "quantization='awq'"),
    (dict(speculative_config={"method": "ngram"}), "speculative_config"),
    (dict(max_num_seqs=0), "max_num_seqs=0"), (dict(max_num_seqs=True), "max_num_seqs=True"),
    (dict(block_size=12), "block_size=12"), (dict(num_kv_blocks=0), "num_kv_blocks=0"),
    (dict(max_model_len=1.5), "max_model_len=1.5"), (dict(seed=None), "seed=None"),
    (dict(gpu_memory_utilization=math.nan), "gpu_memory_utilization=nan"),
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching='yes'"),
    (dict(enforce_eager=1), "enforce_eager=1"),
    (dict(device="tpu"), "device='tpu'"), (dict(tokenizer=123), "tokenizer=123"),
    (dict(download_dir=5), "download_dir=5"),
])
def test_bad_llm_arguments(tmp_path, kw, match):
    make_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=match) as e:
        make_llm(str(tmp_path), show_progress=False, **kw)
    assert any(w in str(e.value) for w in ("not supported", "must be", "use 'auto'"))


@pytest.mark.parametrize("model", [None, 123])
def test_model_must_be_a_path(model):
    from engine import LLM
    with pytest.raises(ValueError, match=f"LLM\\(model={model!r}\\): must be a path"):
        LLM(model)


def test_harmless_vllm_arguments_warn_once_and_unknown_ones_raise(tmp_path, monkeypatch):
    make_checkpoint(tmp_path)
    monkeypatch.setattr(request_validation, "_warned", set())
    with pytest.warns(UserWarning) as rec:
        make_llm(str(tmp_path), show_progress=False, trust_remote_code=True, tensor_parallel_size=1)
    assert sorted(str(w.message).split("=")[0] for w in rec) == ["LLM(tensor_parallel_size",
                                                                   "LLM(trust_remote_code"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # a second time: silent
        make_llm(str(tmp_path), show_progress=False, trust_remote_code=True, tensor_parallel_size=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_arg'"):
        make_llm(str(tmp_path), show_progress=False, no_such_arg=1)


def test_tokenizer_files_without_tokenizer_model(tmp_path):
    make_checkpoint(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    with pytest.raises(CheckpointError) as e:
        make_llm(str(tmp_path), show_progress=False)
    msg = str(e.value)
    assert "tokenizer.model" in msg and "skip_tokenizer_init=True" in msg and "tokenizer_config.json" in msg
    llm = make_llm(str(tmp_path), show_progress=False, skip_tokenizer_init=True)
    assert llm.tokenizer is None
