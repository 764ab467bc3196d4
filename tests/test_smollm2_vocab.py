"""SmolLM2-135M-Instruct with Self-RAG's vocabulary (selfrag/smollm2_vocab.py): the pinned
base, the 16 tokens as single ids after the base's 49152, their embedding rows from their
words (hand-computed here from the base's own files), Self-RAG's prompt format as the
chat template, and the engine equal to transformers on the result. Skips with the reason
where the PyPI wheel cannot be fetched, as the other SmolLM2 tests do."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from engine import SamplingParams
from selfrag import tokens as T
from tests import smollm2
from tests.helpers import hf_greedy


@pytest.fixture(scope="module")
def base_dir():
    return smollm2.model_dir()


@pytest.fixture(scope="module")
def vocab_dir(base_dir, tmp_path_factory):
    from selfrag.smollm2_vocab import extend_vocabulary
    return extend_vocabulary(base_dir, str(tmp_path_factory.mktemp("smollm2_vocab") / "ckpt"))


def test_the_base_is_pinned(base_dir, tmp_path):
    from engine.model.pypi_models import gguf_file
    from selfrag.smollm2_vocab import check_base
    check_base(gguf_file("smollm2", smollm2.CACHE))          # the real one passes
    fake = tmp_path / "other.gguf"
    fake.write_bytes(b"GGUF not the pinned one")
    with pytest.raises(ValueError, match="is not the pinned SmolLM2-135M-Instruct base"):
        check_base(str(fake))


def test_tokens_rows_and_config(base_dir, vocab_dir):
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    base_tok = Tokenizer.from_file(os.path.join(base_dir, "tokenizer.json"))
    tok = Tokenizer.from_file(os.path.join(vocab_dir, "tokenizer.json"))
    for i, t in enumerate(T.ADDED_TOKENS):
        assert tok.encode(t, add_special_tokens=False).ids == [49152 + i], t
    text = "The alpaca (Vicugna pacos) is a camelid, bred for its fibre; Paris, Nairobi, Ngoga Waéi."
    assert tok.encode(text).ids == base_tok.encode(text).ids              # ordinary text unchanged
    mixed = f"{T.RETRIEVAL}{T.PARAGRAPH_START}Paris{T.PARAGRAPH_END}{T.RELEVANT} Yes.{T.UTILITY_TOKENS[4]}"
    assert tok.encode(mixed, add_special_tokens=False).ids == (
        [49153, 49157] + base_tok.encode("Paris", add_special_tokens=False).ids + [49158, 49156]
        + base_tok.encode(" Yes.", add_special_tokens=False).ids + [49163])
    with open(os.path.join(vocab_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["vocab_size"] == 49168 and cfg["pad_token_id"] == 49167 and cfg["tie_word_embeddings"]
    base = load_file(os.path.join(base_dir, "model.safetensors"))["model.embed_tokens.weight"]
    got = load_file(os.path.join(vocab_dir, "model.safetensors"))
    assert "lm_head.weight" not in got                                     # the head stays tied
    embed = got["model.embed_tokens.weight"]
    assert embed.shape == (49168, 576) and torch.equal(embed[:49152], base)
    words = {T.FULLY_SUPPORTED: " supported", T.PARAGRAPH_START: "paragraph"}      # by hand
    fully = base[base_tok.encode("Fully", add_special_tokens=False).ids + base_tok.encode(
        words[T.FULLY_SUPPORTED], add_special_tokens=False).ids].mean(0)
    assert torch.allclose(embed[49152 + T.ADDED_TOKENS.index(T.FULLY_SUPPORTED)], fully)
    para = base[base_tok.encode(words[T.PARAGRAPH_START], add_special_tokens=False).ids].mean(0)
    assert torch.allclose(embed[49152 + T.ADDED_TOKENS.index(T.PARAGRAPH_START)], para)
    assert len({tuple(r.tolist()) for r in embed[49152:]}) == 16            # 16 distinct starts


def test_the_pipeline_reads_the_ids_and_the_chat_template_is_self_rags(vocab_dir):
    from engine.tokenizer import get_tokenizer
    from engine.tokenizer.chat_template import load_chat_template, render
    from selfrag.prompts import format_prompt
    from selfrag.vocab import ReflectionVocab
    v = ReflectionVocab.from_tokenizer(get_tokenizer(vocab_dir))
    assert (v.no_retrieval, v.retrieval, v.paragraph_open, v.pad) == (49152, 49153, 49157, 49167)
    assert v.utility == [49159, 49160, 49161, 49162, 49163] and v.eos == 2          # <|im_end|>
    template = load_chat_template(vocab_dir)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert render(template, msgs, add_generation_prompt=True, bos_token="", eos_token="<|im_end|>") == \
        format_prompt("What is the capital of France?")


def test_engine_equals_transformers_on_it(vocab_dir):
    """Greedy tokens and raw log-probs of a Self-RAG prompt, engine vs HF, fp32."""
    from transformers import LlamaForCausalLM

    from engine import LLM
    from selfrag.prompts import format_prompt
    hf = LlamaForCausalLM.from_pretrained(vocab_dir, dtype=torch.float32).eval()
    llm = LLM(vocab_dir, device="cpu", show_progress=False)
    prompt = llm.get_tokenizer().encode(format_prompt("Name three animals that live in the Andes."))
    ref, rows = hf_greedy(hf, prompt, 16)
    [out] = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=16,
                                                                       ignore_eos=True, logprobs=1), use_tqdm=False)
    comp = out.outputs[0]
    assert comp.token_ids == ref
    assert max(abs(lp[t].logprob - float(r[t])) for lp, t, r in zip(comp.logprobs, ref, rows)) < 1e-3
    assert math.isclose(comp.cumulative_logprob, sum(float(r[t]) for r, t in zip(rows, ref)), abs_tol=1e-3)
