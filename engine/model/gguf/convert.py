"""A Llama-architecture GGUF file -> a Hugging Face checkpoint directory the engine loads.

    python -m engine.model.gguf.convert IN.gguf OUT_DIR [--dtype float32|float16|bfloat16]

``LLM("model.gguf")`` runs the same conversion once (float32) into a cache directory,
``$SELFRAG_CACHE/gguf/<name>-<size>-<mtime>`` (default cache ``~/.cache/selfrag-engine``),
and loads it from there afterwards. What is written:

* ``config.json`` from the ``llama.*`` metadata (layers, widths, heads, KV heads, RoPE
  base and linear scaling, norm eps, context length); embeddings are tied when the file
  has no ``output.weight``.
* ``model.safetensors``: every tensor dequantized (``engine.model.gguf.quants``: F32, F16, BF16,
  Q8_0, Q4_0, Q4_1) in float32, cast once to ``--dtype``; the q/k rows put back from
  GGUF's interleaved RoPE pairs into HF's rotate-half order.
* ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, ``add_bos_token``, the
  ``chat_template``) and ``generation_config.json``, built from the embedded vocabulary
  and merges. Only byte-level BPE vocabularies (``tokenizer.ggml.model`` = "gpt2") are
  supported; the pre-tokenizer follows ``tokenizer.ggml.pre`` (the splits llama.cpp uses).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

from engine.errors import CheckpointError
from engine.model.gguf.quants import UnsupportedTensorType, dequantize, unpermute_qk

# GGUF tensor name -> HF name ({i} = layer)
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")

# GPT-2's split: contractions, letters, digits, other symbols, and whitespace runs.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (digits split one by one first, the split regex or None for GPT-2's)
PRE_TOKENIZERS = {
    "default": (False, None), "gpt-2": (False, None),
    # llama.cpp splits every digit first for these, then applies GPT-2's regex
    "smollm": (True, None), "starcoder": (True, None), "refact": (True, None),
    "llama-bpe": (False, _LLAMA3_SPLIT), "llama3": (False, _LLAMA3_SPLIT),
}


def _field(reader, key: str, default=None, required: bool = False, path: str = ""):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise CheckpointError(f"GGUF metadata key {key!r} is missing", file=path)
        return default
    return f.contents()


def read_config(reader, path: str) -> dict:
    """The HF ``config.json`` dict for the file's ``llama.*`` metadata."""
    arch = _field(reader, "general.architecture", required=True, path=path)
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama')", file=path)
    g = lambda k, d=None, req=False: _field(reader, f"llama.{k}", d, req, path)   # noqa: E731
    hidden, heads = int(g("embedding_length", req=True)), int(g("attention.head_count", req=True))
    tokens = _field(reader, "tokenizer.ggml.tokens", required=True, path=path)
    names = {t.name for t in reader.tensors}
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(g("vocab_size", len(tokens))), "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length", req=True)),
        "num_hidden_layers": int(g("block_count", req=True)), "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", g("rope.dimension_count", hidden // heads))),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling = g("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise CheckpointError(f"GGUF rope scaling {scaling!r} is not supported (only linear)", file=path)
        cfg["rope_scaling"] = {"type": "linear", "factor": float(g("rope.scaling.factor", req=True))}
    if hidden // heads != cfg["head_dim"]:
        raise CheckpointError(f"head size {cfg['head_dim']} != hidden {hidden} / heads {heads}", file=path)
    return cfg


def read_state_dict(reader, cfg: dict, path: str, dtype="float32"):
    """{HF name: torch tensor in ``dtype``} of every tensor in the file."""
    import torch
    target = getattr(torch, dtype)
    sd = {}
    for t in reader.tensors:
        m = _LAYER_RE.match(t.name)
        if t.name in _GLOBAL:
            name = _GLOBAL[t.name]
        elif m and m.group(2) in _LAYER:
            name = f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
        elif t.name == "rope_freqs.weight":
            raise CheckpointError("tensor 'rope_freqs.weight' (Llama-3 RoPE frequency scaling) is not "
                                  "supported", file=path, tensor=t.name)
        else:
            raise CheckpointError(f"unexpected GGUF tensor {t.name!r} for a llama model", file=path,
                                  tensor=t.name)
        shape = tuple(reversed([int(x) for x in t.shape]))      # ggml lists ne0 (the row) first
        try:
            w = dequantize(t.data, t.tensor_type.name, shape)
        except UnsupportedTensorType as e:
            raise CheckpointError(str(e), file=path, tensor=t.name) from None
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        sd[name] = torch.from_numpy(np.ascontiguousarray(w)).to(target)
    return sd


def build_tokenizer(reader, path: str):
    """A ``tokenizers.Tokenizer`` (byte-level BPE) and its tokenizer_config.json dict."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    kind = _field(reader, "tokenizer.ggml.model", required=True, path=path)
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported: only byte-level BPE "
                              "('gpt2') vocabularies are imported", file=path)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                              f"{', '.join(sorted(PRE_TOKENIZERS))}", file=path)
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens", required=True, path=path)]
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", required=True,
                                                        path=path)]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False,
                               ignore_merges=False))
    digits, split = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tok.decoder = decoders.ByteLevel()
    # token types: 3 = control (special), 4 = user-defined (added, not special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == 4])
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos and ids["bos"] is not None:
        bos = tokens[ids["bos"]]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": int(_field(reader, "llama.context_length", 2048))}
    for key, k in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                   ("pad_token", "padding")):
        if ids[k] is not None:
            config[key] = tokens[ids[k]]
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return tok, config


def convert(gguf_path: str, out_dir: str, dtype: str = "float32", progress: bool = True) -> str:
    """Write the HF layout of ``gguf_path`` into ``out_dir``; returns ``out_dir``."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    from engine.model.checkpoint import save_checkpoint
    from engine.model.config import ModelConfig
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"not a readable GGUF file: {e}", file=gguf_path) from None
    hf = read_config(reader, gguf_path)
    hf["torch_dtype"] = dtype
    cfg = ModelConfig.from_dict(hf, source=gguf_path)
    tok, tok_config = build_tokenizer(reader, gguf_path)
    sd = read_state_dict(reader, hf, gguf_path, dtype)
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(out_dir, cfg, sd)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=1, ensure_ascii=False)
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=1)
    if progress:
        print(f"wrote {out_dir}: {len(sd)} tensors ({dtype}), vocab {len(tok.get_vocab())}", file=sys.stderr)
    return out_dir


def cache_root(cache_dir: str | None = None) -> str:
    """Where converted models live: ``cache_dir``, else ``$SELFRAG_CACHE``, else
    ``~/.cache/selfrag-engine``."""
    return cache_dir or os.environ.get("SELFRAG_CACHE") or os.path.expanduser("~/.cache/selfrag-engine")


def converted_dir(gguf_path: str, cache_dir: str | None = None, progress: bool = True) -> str:
    """The cached conversion of ``gguf_path`` (made now if missing; a marker file says it
    finished, so an interrupted conversion is redone, never loaded half-written)."""
    st = os.stat(gguf_path)
    name = os.path.basename(gguf_path)[:-len(".gguf")]
    out = os.path.join(cache_root(cache_dir), "gguf", f"{name}-{st.st_size}-{int(st.st_mtime)}")
    if not os.path.isfile(os.path.join(out, ".converted")):
        convert(gguf_path, out, "float32", progress=progress)
        open(os.path.join(out, ".converted"), "w").close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.model.gguf.convert", description=__doc__.split("\n")[0])
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="directory to write (created)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="weight dtype written (default float32: the dequantized values exactly)")
    a = p.parse_args(argv)
    convert(a.gguf, a.out, a.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
