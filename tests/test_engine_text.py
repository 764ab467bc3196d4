"""Text in and out: tokenizer integration, stop conditions, streaming, errors."""
import os
import shutil

import pytest

from engine import CheckpointError, InvalidRequestError, PromptTooLongError, SamplingParams, SamplingParamsError
from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
from selfrag.default_tokenizer import build_tokenizer
from tests.helpers import make_checkpoint, make_llm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("textmodel")
    build_tokenizer(str(path), vocab_size=600)
    vocab = len(Tokenizer.from_pretrained(str(path)))
    make_checkpoint(path, vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=256)
    return str(path)


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir, show_progress=False)


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def force(token_id, at_step):
    """A processor that forces ``token_id`` at generated position ``at_step``."""
    def proc(logits, request_ids, output_token_ids):
        for row, out in enumerate(output_token_ids):
            if len(out) == at_step:
                logits[row] = float("-inf")
                logits[row, token_id] = 0.0
        return logits
    return proc


GREEDY = dict(temperature=0, ignore_eos=True)


def no_byte_tokens(logits, request_ids, output_token_ids):
    # Random weights emit malformed UTF-8 byte runs, where HF's decode replaces
    # whole runs (see engine/tokenizer/detokenizer.py); keep this comparison to clean text.
    logits[:, 3:259] = float("-inf")
    return logits


def test_text_prompt_tokenized_like_hf_and_text_decoded_like_hf(llm, hf_tok):
    prompt = "### Instruction:\nTell me about llamas.[Retrieval]<paragraph>Alpacas are small.</paragraph>"
    [out] = llm.generate(prompt, SamplingParams(max_tokens=24, skip_special_tokens=False,
                                                logits_processors=[no_byte_tokens], **GREEDY),
                         use_tqdm=False)
    assert out.prompt == prompt
    assert out.prompt_token_ids == hf_tok(prompt)["input_ids"]
    ids = out.outputs[0].token_ids
    full = hf_tok.decode(out.prompt_token_ids + ids)
    assert out.outputs[0].text == full[len(hf_tok.decode(out.prompt_token_ids)):]


def test_skip_special_tokens_hides_added_tokens(llm, model_dir):
    tok = llm.get_tokenizer()
    rel = tok.convert_tokens_to_ids("[Relevant]")
    shown = SamplingParams(max_tokens=4, skip_special_tokens=False, logits_processors=[force(rel, 1)], **GREEDY)
    hidden = SamplingParams(max_tokens=4, logits_processors=[force(rel, 1)], **GREEDY)
    a, b = llm.generate(["Hello there", "Hello there"], [shown, hidden], use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and rel in a.outputs[0].token_ids
    assert "[Relevant]" in a.outputs[0].text and "[Relevant]" not in b.outputs[0].text


def test_eos_stops_and_is_kept_in_ids_not_text(llm):
    tok = llm.get_tokenizer()
    sp = SamplingParams(temperature=0, max_tokens=20, logits_processors=[force(tok.eos_token_id, 3)])
    [out] = llm.generate("The llama", sp, use_tqdm=False)
    c = out.outputs[0]
    assert c.finish_reason == "stop" and len(c.token_ids) == 4 and c.token_ids[-1] == tok.eos_token_id
    assert "</s>" not in c.text and out.finished
    # ignore_eos goes on to max_tokens
    sp2 = SamplingParams(max_tokens=6, logits_processors=[force(tok.eos_token_id, 3)], **GREEDY)
    assert llm.generate("The llama", sp2, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_stop_token_ids(llm):
    sp = SamplingParams(max_tokens=20, stop_token_ids=[77], logits_processors=[force(77, 2)], **GREEDY)
    c = llm.generate("Alpacas", sp, use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == 77 and c.token_ids[-1] == 77
    assert len(c.token_ids) == 3


def test_stop_string_cuts_text(llm):
    free = llm.generate("Alpacas live in", SamplingParams(max_tokens=30, **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    text = free.text
    assert len(text) > 12
    stop = text[8:12]
    first = text.find(stop)
    c = llm.generate("Alpacas live in", SamplingParams(max_tokens=30, stop=[stop, "\x00never"], **GREEDY),
                     use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[:first]
    assert free.token_ids[:len(c.token_ids)] == c.token_ids


def test_stream_deltas_join_to_generate_text(llm):
    sp = SamplingParams(max_tokens=25, **GREEDY)
    deltas = list(llm.stream("Camelids of the Andes", sp))
    [out] = llm.generate("Camelids of the Andes", sp, use_tqdm=False)
    assert "".join(deltas) == out.outputs[0].text and len(deltas) > 3
    assert not llm.has_unfinished_requests()


def test_step_api(llm):
    rid = llm.add_request("One two three", SamplingParams(max_tokens=5, **GREEDY), request_id="mine")
    assert rid == "mine"
    with pytest.raises(InvalidRequestError):
        llm.add_request("again", SamplingParams(), request_id="mine")
    seen = []
    while llm.has_unfinished_requests():
        for out in llm.step():
            seen.append((len(out.outputs[0].token_ids), out.finished))
    assert seen == [(1, False), (2, False), (3, False), (4, False), (5, True)]


BAD_REQUESTS = [
    ("", None, "empty"),
    ({"prompt_token_ids": []}, None, "empty"),
    ({"prompt_token_ids": [1, 10**9]}, None, "prompt_token_ids"),
    ({"prompt_token_ids": list(range(1, 257))}, None, "max_model_len"),
    ("x " * 400, None, "max_model_len"),
    ("ok", SamplingParams(logprob_token_ids=[10**7]), "logprob_token_ids"),
    (42, None, "prompt"),
]


@pytest.mark.parametrize("prompt,params,match", BAD_REQUESTS)
def test_bad_requests_raise_clear_errors_and_engine_goes_on(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match) as info:
        llm.generate([" fine prompt", prompt], params or SamplingParams(), use_tqdm=False)
    assert isinstance(info.value, InvalidRequestError)
    # nothing was queued, not even the good prompt before the bad one
    assert not llm.has_unfinished_requests()
    [out] = llm.generate("Still working?", SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3


def test_prompt_too_long_is_its_own_error(llm):
    with pytest.raises(PromptTooLongError, match="255 tokens|256 tokens"):
        llm.generate({"prompt_token_ids": [5] * 256}, use_tqdm=False)


@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=0), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(logprobs=-2), "logprobs"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"), (dict(stop=[""]), "stop"),
    (dict(logits_processors=[3]), "logits_processors"), (dict(seed="x"), "seed"),
])
def test_invalid_sampling_params_name_the_field(kw, field):
    with pytest.raises(SamplingParamsError, match=f"SamplingParams.{field}="):
        SamplingParams(**kw)


def test_no_tokenizer_means_token_id_prompts(model_dir):
    llm = make_llm(model_dir, skip_tokenizer_init=True, show_progress=False)
    assert llm.get_tokenizer() is None
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)
    [out] = llm.generate({"prompt_token_ids": [1, 5, 6]}, SamplingParams(max_tokens=2, **GREEDY),
                         use_tqdm=False)
    assert out.outputs[0].text == "" and len(out.outputs[0].token_ids) == 2


def test_bad_checkpoint_errors_name_file_and_tensor(model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    make_checkpoint(bad, num_shards=3, vocab_size=LLM_VOCAB(model_dir))
    os.remove(bad / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        make_llm(str(bad), show_progress=False)
    with pytest.raises(ValueError, match="no such local checkpoint"):
        make_llm(str(tmp_path / "nowhere"), show_progress=False)
    # a mismatching shape names the tensor
    make_checkpoint(bad, vocab_size=LLM_VOCAB(model_dir))
    import json
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] += 16
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*mlp\.(gate_proj|down_proj)\.weight"):
        make_llm(str(bad), show_progress=False)


def LLM_VOCAB(model_dir):
    return len(Tokenizer.from_pretrained(model_dir))


def test_hub_id_resolves_to_local_snapshot(model_dir, tmp_path):
    snap = tmp_path / "models--selfrag--selfrag_llama2_7b" / "snapshots" / "abc123"
    shutil.copytree(model_dir, snap)
    llm = make_llm("selfrag/selfrag_llama2_7b", download_dir=str(tmp_path), dtype="float32",
              show_progress=False)
    assert llm.model_dir == str(snap) and llm.get_tokenizer() is not None


def test_dummy_weights_from_config_dir_or_builtin(tmp_path):
    import json

    from engine.model.config import ModelConfig
    from tests.helpers import BASE
    # built-in names give the real shapes (the 7B itself is loaded in the GPU benchmarks)
    cfg = ModelConfig.from_pretrained("selfrag-7b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size,
            cfg.max_position_embeddings, cfg.tie_word_embeddings) == (4096, 32, 11008, 32016, 4096, False)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "llama"}))
    a = make_llm(str(tmp_path), load_format="dummy", seed=3, show_progress=False)
    b = make_llm(str(tmp_path), load_format="dummy", seed=3, show_progress=False)
    assert a.get_tokenizer() is None
    sp = SamplingParams(max_tokens=6, **GREEDY)
    ids = [o.outputs[0].token_ids for o in (a.generate({"prompt_token_ids": [1, 2, 3]}, sp, use_tqdm=False)[0],
                                             b.generate({"prompt_token_ids": [1, 2, 3]}, sp, use_tqdm=False)[0])]
    assert ids[0] == ids[1] and len(ids[0]) == 6      # seeded: the same random model twice
