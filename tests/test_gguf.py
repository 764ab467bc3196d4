"""GGUF import: dequantization against the ``gguf`` package's own, the q/k row order
against RoPE itself, and whole tiny files written with ``gguf.GGUFWriter`` converted and
checked against the model they came from. (The real SmolLM2 file: test_real_weights.py.)"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize, quantize  # noqa: E402

from engine.errors import CheckpointError  # noqa: E402
from engine.model.gguf.convert import convert  # noqa: E402
from engine.model.gguf.quants import dequantize, permute_qk, unpermute_qk  # noqa: E402


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("shape", [(3, 32), (7, 96), (64, 576)])
def test_block_formats_equal_gguf_bit_for_bit(kind, shape):
    rng = np.random.default_rng(sum(shape))
    # random bytes, with the fp16 scales replaced by finite values (any bit pattern is a
    # valid block except NaN/inf scales, which no quantizer writes)
    per = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // 32 * per), dtype=np.uint8)
    blocks = raw.reshape(-1, per)
    n_scales = 2 if kind == "Q4_1" else 1
    blocks[:, :2 * n_scales] = rng.normal(0, 0.05, size=(len(blocks), n_scales)).astype("<f2").view(np.uint8)
    want = gguf_dequantize(raw, getattr(Q, kind)).reshape(shape)
    got = dequantize(raw, kind, shape)
    assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("kind,np_dtype", [("F32", np.float32), ("F16", np.float16)])
def test_plain_formats(kind, np_dtype):
    x = np.random.default_rng(0).normal(size=(5, 40)).astype(np_dtype)
    assert np.array_equal(dequantize(x.view(np.uint8), kind, (5, 40)), x.astype(np.float32))


def test_bf16_is_the_top_half_of_float32():
    x = torch.randn(6, 33).to(torch.bfloat16)
    raw = x.view(torch.int16).numpy().view(np.uint8)
    assert torch.equal(torch.from_numpy(dequantize(raw, "BF16", (6, 33))), x.float())


def test_unsupported_type_and_bad_sizes_are_named():
    with pytest.raises(ValueError, match="Q5_0 is not supported"):
        dequantize(np.zeros(22, np.uint8), "Q5_0", (32,))
    with pytest.raises(ValueError, match="not a whole number"):
        dequantize(np.zeros(34, np.uint8), "Q8_0", (31,))
    with pytest.raises(ValueError, match="expected 68"):
        dequantize(np.zeros(34, np.uint8), "Q8_0", (64,))


def _rope_interleaved(x, pos, theta=10000.0):
    """ggml's RoPE (mode 0): rotates adjacent pairs (2i, 2i+1) by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    f = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * f.cos() - b * f.sin(), a * f.sin() + b * f.cos()
    return out


def _rope_half(x, pos, theta=10000.0):
    """HF's RoPE: rotates (i, i + D/2) by the same frequencies (rotate_half)."""
    d = x.shape[-1]
    f = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = torch.cat([f.cos(), f.cos()]), torch.cat([f.sin(), f.sin()])
    return x * c + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * s


def test_qk_row_order_is_what_makes_the_two_ropes_agree():
    """With GGUF's rows, ggml's pairwise RoPE then a dot product equals HF's rotate-half
    RoPE on the un-permuted rows: scores q.k are the same at every position pair."""
    g = torch.Generator().manual_seed(0)
    heads, d, hidden = 3, 16, 24
    wq = torch.randn(heads * d, hidden, dtype=torch.float64, generator=g)
    wk = torch.randn(heads * d, hidden, dtype=torch.float64, generator=g)
    x1 = torch.randn(hidden, dtype=torch.float64, generator=g)
    x2 = torch.randn(hidden, dtype=torch.float64, generator=g)
    gq, gk = (torch.from_numpy(permute_qk(w.numpy(), heads)) for w in (wq, wk))
    for p1, p2 in ((0, 0), (3, 1), (17, 5)):
        hf = (_rope_half((wq @ x1).view(heads, d), p1) * _rope_half((wk @ x2).view(heads, d), p2)).sum(-1)
        gg = (_rope_interleaved((gq @ x1).view(heads, d), p1)
              * _rope_interleaved((gk @ x2).view(heads, d), p2)).sum(-1)
        torch.testing.assert_close(gg, hf, rtol=1e-10, atol=1e-10)
    assert np.array_equal(unpermute_qk(gq.numpy(), heads), wq.numpy())


# ----------------------------------------------------------------------------- whole files

def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog 1234", "llamas and alpacas are camelids",
            "Paris is the capital of France. Größe, naïve café ☃"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


TINY = dict(hidden=64, heads=4, kv=2, inter=96, layers=2)


def _write_gguf(path, tok, sd, types, arch="llama", tok_model="gpt2", pre="smollm", tied=False):
    vocab = tok.get_vocab_size()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["inter"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv"])
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list([tok.id_to_token(i) for i in range(vocab)])
    w.add_token_types([3 if i < 3 else 1 for i in range(vocab)])
    model = json.loads(tok.to_str())["model"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    rev = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
    for name, t in sd.items():
        if tied and name == "lm_head.weight":
            continue
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{rev[rest[:-len('.weight')]]}.weight"
        else:
            gname = names[name]
        a = t.numpy()
        if "q_proj" in name:
            a = permute_qk(a, TINY["heads"])
        elif "k_proj" in name:
            a = permute_qk(a, TINY["kv"])
        kind = types.get(name, "F32") if a.ndim == 2 else "F32"
        if kind == "F32":
            w.add_tensor(gname, a.astype(np.float32))
        elif kind == "F16":
            w.add_tensor(gname, a.astype(np.float16))
        else:
            qa = quantize(a.astype(np.float32), getattr(Q, kind))
            w.add_tensor(gname, qa, raw_shape=qa.shape, raw_dtype=getattr(Q, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_state_dict(vocab):
    from engine.model.checkpoint import random_state_dict
    from engine.model.config import ModelConfig
    cfg = ModelConfig.from_dict(dict(vocab_size=vocab, hidden_size=TINY["hidden"],
                                     intermediate_size=TINY["inter"], num_hidden_layers=TINY["layers"],
                                     num_attention_heads=TINY["heads"], num_key_value_heads=TINY["kv"],
                                     max_position_embeddings=256, rope_theta=50000.0))
    return {k: v.float() for k, v in random_state_dict(cfg, seed=1, std=0.1).items()}


def test_lossless_file_converts_to_the_same_model_and_tokenizer(tmp_path):
    """All-F32 GGUF: the converted checkpoint is the original model exactly (q/k rows
    restored), so HF computes the same logits from both; the tokenizer and chat template
    come back as written."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = _tiny_tokenizer()
    sd = _tiny_state_dict(tok.get_vocab_size())
    _write_gguf(tmp_path / "m.gguf", tok, sd, {})
    out = convert(str(tmp_path / "m.gguf"), str(tmp_path / "hf"), progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == (2, 50000.0, False)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       rope_theta=50000.0, rms_norm_eps=1e-5, max_position_embeddings=256))
    ref.load_state_dict(sd)
    got = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref.eval()(ids).logits, rtol=0, atol=0)
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in ["the quick brown fox 1234", "Größe naïve ☃ <|im_end|> x", "  spaces\n\nand 42"]:
        assert hf_tok.encode(text) == tok.encode(text).ids, text
    msgs = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_quantized_tensors_dequantize_like_gguf_and_unpermute(tmp_path):
    tok = _tiny_tokenizer()
    sd = _tiny_state_dict(tok.get_vocab_size())
    types = {"model.embed_tokens.weight": "Q8_0", "lm_head.weight": "F16",
             "model.layers.0.self_attn.q_proj.weight": "Q4_0", "model.layers.0.self_attn.k_proj.weight": "Q4_1",
             "model.layers.1.mlp.down_proj.weight": "Q4_1", "model.layers.1.self_attn.v_proj.weight": "Q8_0"}
    _write_gguf(tmp_path / "m.gguf", tok, sd, types)
    out = convert(str(tmp_path / "m.gguf"), str(tmp_path / "hf"), dtype="float32", progress=False)
    from safetensors.torch import load_file
    got = load_file(f"{out}/model.safetensors")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    by_name = {t.name: t for t in reader.tensors}
    heads = {"q_proj": TINY["heads"], "k_proj": TINY["kv"]}
    for name, kind in types.items():
        gname = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}.get(name)
        if gname is None:
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}." + {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                                   "mlp.down_proj.weight": "ffn_down",
                                   "self_attn.v_proj.weight": "attn_v"}[rest] + ".weight"
        t = by_name[gname]
        want = gguf_dequantize(t.data, t.tensor_type).reshape(sd[name].shape).astype(np.float32)
        for key, h in heads.items():
            if key in name:     # the test's own inverse: HF row h*D + s*D/2 + i <- GGUF row h*D + 2i + s
                d = want.shape[0] // h
                idx = [hh * d + 2 * i + s for hh in range(h) for s in (0, 1) for i in range(d // 2)]
                want = want[idx]
        assert torch.equal(got[name], torch.from_numpy(want)), name
        err = (got[name] - sd[name]).abs().max() / sd[name].abs().max()
        assert err < (0.15 if kind.startswith("Q4") else 0.01), (name, float(err))   # it is a quantization


@pytest.mark.parametrize("case,match", [
    (dict(arch="gemma"), "architecture 'gemma' is not supported"),
    (dict(tok_model="llama"), "tokenizer model 'llama' is not supported"),
    (dict(pre="weird-pre"), "pre-tokenizer 'weird-pre' is not supported"),
])
def test_unsupported_files_are_refused_by_name(tmp_path, case, match):
    tok = _tiny_tokenizer()
    _write_gguf(tmp_path / "m.gguf", tok, _tiny_state_dict(tok.get_vocab_size()), {}, **case)
    with pytest.raises(CheckpointError, match=match):
        convert(str(tmp_path / "m.gguf"), str(tmp_path / "hf"), progress=False)


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    tok = _tiny_tokenizer()
    sd = _tiny_state_dict(tok.get_vocab_size())
    _write_gguf(tmp_path / "m.gguf", tok, sd, {"model.layers.1.mlp.up_proj.weight": "Q5_0"})
    with pytest.raises(CheckpointError, match="Q5_0 is not supported") as e:
        convert(str(tmp_path / "m.gguf"), str(tmp_path / "hf"), progress=False)
    assert "blk.1.ffn_up.weight" in str(e.value)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        convert(str(tmp_path / "x.gguf"), str(tmp_path / "hf"), progress=False)


def test_llm_loads_a_gguf_file_through_a_cached_conversion(tmp_path, monkeypatch):
    from engine import LLM, SamplingParams
    monkeypatch.setenv("SELFRAG_CACHE", str(tmp_path / "cache"))
    tok = _tiny_tokenizer()
    _write_gguf(tmp_path / "m.gguf", tok, _tiny_state_dict(tok.get_vocab_size()), {"lm_head.weight": "Q8_0"})
    ref = LLM(convert(str(tmp_path / "m.gguf"), str(tmp_path / "hf"), progress=False), show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = ref.generate("llamas and alpacas", params, use_tqdm=False)[0].outputs[0].token_ids
    for _ in range(2):              # the second load reuses the conversion
        llm = LLM(str(tmp_path / "m.gguf"), show_progress=False)
        assert llm.generate("llamas and alpacas", params, use_tqdm=False)[0].outputs[0].token_ids == want
    [conv] = os.listdir(tmp_path / "cache" / "gguf")
    assert conv.startswith("m-") and os.path.isfile(tmp_path / "cache" / "gguf" / conv / ".converted")
