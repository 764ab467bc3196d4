"""The embedded default model, the model-card demo and the ``selfrag`` CLI.

The checkpoint is built once per session into a temporary cache (via
``$SELFRAG_CACHE``); transformers is the reference for the layout and for
greedy generation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from selfrag import default_model as dm
from selfrag.tokens import ADDED_TOKENS, PARAGRAPH_START, RETRIEVAL

transformers = pytest.importorskip("transformers")

SELFRAG_LAYOUT = {
    "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "tokenizer.model", "added_tokens.json",
    "special_tokens_map.json", "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("selfrag-cache")


@pytest.fixture(scope="module")
def model_dir(cache) -> str:
    return dm.random_model_dir(cache)


@pytest.fixture
def env_cache(cache, model_dir, monkeypatch):
    """Points $SELFRAG_CACHE at the already built module cache (for the demo and CLI)."""
    monkeypatch.setenv(dm.CACHE_ENV, str(cache))
    return model_dir


def _digests(d: str | Path) -> dict[str, str]:
    d = Path(d)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _exit_code(fn) -> int:
    try:
        return fn()
    except SystemExit as e:
        return e.code


# ---------------------------------------------------------------- layout
def test_layout_is_exactly_selfrag(model_dir, cache):
    assert Path(model_dir) == cache / dm.DEFAULT_NAME
    assert set(os.listdir(model_dir)) == SELFRAG_LAYOUT
    assert set(dm.LAYOUT_FILES) == SELFRAG_LAYOUT
    # no temporary build directories are left next to it
    assert os.listdir(cache) == [dm.DEFAULT_NAME]
    index = json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                 "model-00002-of-00002.safetensors"}
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["max_position_embeddings"] == 2048
    assert cfg["tie_word_embeddings"] is False


def test_transformers_loads_it(model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    base = len(tok) - len(ADDED_TOKENS)
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # The 16 added tokens: single ids, in order, right after the base vocabulary.
    for i, token in enumerate(ADDED_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [base + i], token
    assert tok.pad_token == "<pad>" and tok.pad_token_id == model.config.pad_token_id == base + 15
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2


def test_reflection_tokens_are_single_ids_in_prompts(model_dir):
    from transformers import AutoTokenizer

    from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
    from selfrag.cli.demo import DEMO_PROMPTS

    hf = AutoTokenizer.from_pretrained(model_dir)
    ours = Tokenizer.from_pretrained(model_dir)
    prompt = DEMO_PROMPTS[2].prompt
    assert RETRIEVAL in prompt and PARAGRAPH_START in prompt
    ids = ours.encode(prompt)
    assert ids == hf(prompt)["input_ids"]
    for token in (RETRIEVAL, PARAGRAPH_START, "</paragraph>"):
        tid = hf.convert_tokens_to_ids(token)
        assert ours.convert_tokens_to_ids(token) == tid
        assert ids.count(tid) == 1, token


# ---------------------------------------------------------------- determinism / caching
def test_build_is_deterministic_and_cached(model_dir, tmp_path, capsys, monkeypatch):
    other = dm.random_model_dir(tmp_path / "other")
    assert "building the embedded default model (random weights)" in capsys.readouterr().err
    assert other != model_dir
    assert _digests(other) == _digests(model_dir)

    # A second call reuses the cache: no build, no message, files untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(other).iterdir()}

    def no_build(*a, **k):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(dm, "build_default_model", no_build)
    assert dm.random_model_dir(tmp_path / "other") == other
    assert capsys.readouterr().err == ""
    assert {p.name: p.stat().st_mtime_ns for p in Path(other).iterdir()} == mtimes


def test_env_var_and_interrupted_build(tmp_path, monkeypatch):
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path))
    assert dm.cache_root() == tmp_path

    def crash(out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "build_default_model", crash)
    with pytest.raises(KeyboardInterrupt):
        dm.random_model_dir()
    assert os.listdir(tmp_path) == []          # no half checkpoint, no temp dir


# ---------------------------------------------------------------- generation parity
def test_greedy_matches_transformers(model_dir):
    from selfrag.cli.demo import DEMO_PROMPTS, demo_sampling_params
    from tests.helpers import hf_greedy, hf_model, make_llm

    llm = make_llm(model_dir, dtype="float32", max_num_seqs=2, show_progress=False)
    prompt_ids = llm.tokenizer.encode(DEMO_PROMPTS[1].prompt)   # top-2 logit gaps >= 0.03
    params = demo_sampling_params(20)
    params.ignore_eos = True
    out = llm.generate({"prompt_token_ids": prompt_ids}, params, use_tqdm=False)[0].outputs[0]
    ref, _ = hf_greedy(hf_model(model_dir, torch.float32), prompt_ids, 20)
    assert len(out.token_ids) == 20
    assert out.token_ids == ref


# ---------------------------------------------------------------- demo and CLI
def test_demo_end_to_end(env_cache, capsys):
    from selfrag import demo

    threads = torch.get_num_threads()
    assert demo.main(["--device", "cpu", "--max-tokens", "3", "--model", env_cache]) == 0
    assert torch.get_num_threads() == threads          # the one-thread block is undone
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "--model PATH" in text
    assert text.count("RANDOM weights") >= 2            # at the top and at the bottom
    assert "### Instruction:\n    Leave odd one out: twitter, instagram, whatsapp." in text
    assert text.count("Can you tell me the difference between llamas and alpacas?") == 2
    assert "[Retrieval]<paragraph>The alpaca (Lama pacos)" in text
    assert "tokens/s" in text and text.count("finish_reason=") == 3


def test_cli_generate(env_cache, capsys):
    from selfrag.cli import main

    assert main(["generate", "--device", "cpu", "--max-tokens", "5", "--show-special-tokens", "hello"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()                          # some generated text
    assert "5 tokens" in captured.err and "tokens/s" in captured.err
    assert "embedded miniature Self-RAG model" in captured.err


def test_cli_bad_model_exits_2(tmp_path, capsys):
    from selfrag.cli import main

    missing = tmp_path / "no-such-checkpoint"
    assert _exit_code(lambda: main(["generate", "--device", "cpu", "--model", str(missing), "hi"])) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _exit_code(lambda: main(["demo", "--device", "cpu", "--model", str(empty)])) == 2
    assert str(empty) in capsys.readouterr().err

    # a directory with a config but broken weights: the engine's error, one line
    (empty / "config.json").write_text(json.dumps({"vocab_size": 10}))
    assert _exit_code(lambda: main(["generate", "--device", "cpu", "--model", str(empty), "hi"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfrag: error:") and len(err.strip().splitlines()) == 1

    assert _exit_code(lambda: main(["generate", "--device", "cpu", "--max-tokens", "0", "hi"])) == 2


def test_printable_escapes_control_characters():
    from selfrag.cli.common import printable

    assert printable("a\x00b\x1b[0m\n\tc[Retrieval]é") == "a\\x00b\\x1b[0m\n\tc[Retrieval]é"
