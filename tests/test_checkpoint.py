"""Tests for engine.model.config / engine.model.checkpoint (tiny configs, CPU only)."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from engine.errors import CheckpointError, ConfigError
from engine.model.checkpoint import (
    INDEX_NAME,
    find_weight_files,
    load_weights,
    random_state_dict,
    save_checkpoint,
)
from engine.model.config import BUILTIN_CONFIGS, ModelConfig

transformers = pytest.importorskip("transformers")


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=256, dtype="float32",
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    base.update(kw)
    return ModelConfig(**base)


MHA = tiny()
GQA = tiny(num_key_value_heads=2, rope_theta=500000.0, eos_token_id=[2, 7], pad_token_id=None)
TIED = tiny(tie_word_embeddings=True, num_key_value_heads=1)
LINEAR = tiny(rope_scaling_factor=4.0, max_position_embeddings=1024)
BF16 = tiny(dtype="bfloat16", num_key_value_heads=2)


def save(tmp_path, cfg, num_shards=1, spelling=4, dtype=torch.float32, name="ckpt"):
    sd = random_state_dict(cfg, seed=123, dtype=dtype)
    d = tmp_path / name
    save_checkpoint(d, cfg, sd, num_shards=num_shards, spelling=spelling)
    return d, sd


def collect(d, cfg, **kw):
    got: dict[str, torch.Tensor] = {}

    def consume(name, t):
        assert name not in got, f"{name} consumed twice"
        got[name] = t.clone()

    load_weights(d, cfg.weight_shapes(), consume, progress=False, **kw)
    return got


# ----------------------------------------------------------------------------- config
def test_builtins():
    c7 = ModelConfig.from_pretrained("selfrag-7b")
    assert (c7.hidden_size, c7.num_hidden_layers, c7.num_attention_heads, c7.num_key_value_heads) == (4096, 32, 32, 32)
    assert (c7.intermediate_size, c7.vocab_size, c7.rms_norm_eps, c7.max_position_embeddings) == (
        11008, 32016, 1e-5, 4096)
    assert (c7.dtype, c7.bos_token_id, c7.eos_token_id, c7.pad_token_id, c7.tie_word_embeddings) == (
        "bfloat16", 1, 2, 32015, False)
    assert 6.7e9 < c7.num_params() < 6.8e9  # Llama-2-7B: 6.74B (+16 rows of vocab)
    c13 = ModelConfig.from_pretrained("selfrag-13b")
    assert (c13.hidden_size, c13.num_hidden_layers, c13.num_attention_heads, c13.intermediate_size) == (
        5120, 40, 40, 13824)
    assert 13.0e9 < c13.num_params() < 13.1e9
    with pytest.raises(ConfigError, match="selfrag-13b") as ei:
        ModelConfig.from_pretrained("selfrag-70b")
    assert "selfrag-7b" in str(ei.value)


def test_builtin_name_is_not_inferred_from_folder(tmp_path, monkeypatch):
    # a directory called selfrag-7b is read as a directory, never as the built-in
    d = tmp_path / "selfrag-7b"
    d.mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_pretrained("selfrag-7b")
    (d / "config.json").write_text(json.dumps(MHA.to_hf_dict()))
    assert ModelConfig.from_pretrained("selfrag-7b") == MHA


def test_weight_shapes_gqa_and_tied():
    s = GQA.weight_shapes()
    assert s["model.layers.1.self_attn.q_proj.weight"] == (64, 64)
    assert s["model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert s["model.layers.1.self_attn.v_proj.weight"] == (32, 64)
    assert s["model.layers.1.self_attn.o_proj.weight"] == (64, 64)
    assert s["model.layers.0.mlp.down_proj.weight"] == (64, 172)
    assert s["model.norm.weight"] == (64,)
    assert s["lm_head.weight"] == (300, 64)
    assert len(s) == 1 + 2 * 9 + 2
    assert "lm_head.weight" not in TIED.weight_shapes()
    assert TIED.num_params() == sum(torch.Size(v).numel() for v in TIED.weight_shapes().values())


@pytest.mark.parametrize("kw", [
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
    dict(hidden_size=64, num_attention_heads=4, rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=5e5,
         torch_dtype="bfloat16"),
    dict(hidden_size=64, num_attention_heads=8,
         rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}, dtype="float16",
         tie_word_embeddings=True, eos_token_id=[2, 5]),
    dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=4096),
])
def test_from_dict_reads_what_transformers_writes(kw):
    hf = transformers.LlamaConfig(vocab_size=300, intermediate_size=172, num_hidden_layers=2, **kw)
    for d in (hf.to_dict(), json.loads(hf.to_json_string())):
        c = ModelConfig.from_dict(d)
        assert c.hidden_size == hf.hidden_size and c.num_attention_heads == hf.num_attention_heads
        assert c.num_key_value_heads == hf.num_key_value_heads and c.head_dim == hf.head_dim
        assert c.rms_norm_eps == hf.rms_norm_eps
        assert c.max_position_embeddings == hf.max_position_embeddings
        assert c.tie_word_embeddings == hf.tie_word_embeddings
        assert c.rope_theta == hf.rope_parameters["rope_theta"]
        assert c.rope_scaling_factor == (hf.rope_parameters.get("factor") or 1.0)
        want_dtype = None if hf.dtype is None else str(hf.dtype).removeprefix("torch.")
        assert c.dtype == want_dtype
        want_eos = tuple(hf.eos_token_id) if isinstance(hf.eos_token_id, list) else hf.eos_token_id
        assert c.eos_token_id == want_eos


def test_from_dict_v4_hub_style_defaults():
    # a typical Llama-2 hub config.json (transformers 4.31): no head_dim / kv heads / rope_theta
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
         "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300, "rope_scaling": None,
         "torch_dtype": "bfloat16", "transformers_version": "4.31.0"}
    c = ModelConfig.from_dict(d)
    assert (c.num_key_value_heads, c.head_dim, c.rms_norm_eps, c.rope_theta) == (4, 16, 1e-6, 10000.0)
    assert (c.rope_scaling_factor, c.max_position_embeddings, c.tie_word_embeddings, c.dtype) == (
        1.0, 2048, False, "bfloat16")
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, None)
    # v4 rope_scaling spelled with rope_type instead of type
    c2 = ModelConfig.from_dict({**d, "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 1e6})
    assert (c2.rope_scaling_factor, c2.rope_theta) == (2.0, 1e6)


@pytest.mark.parametrize("patch, field", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"model_type": "mistral"}, "model_type"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"type": "linear"}}, "factor"),
])
def test_from_dict_rejects_unsupported(patch, field):
    d = {**MHA.to_hf_dict(4), **patch}
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict(d, source="/x/config.json")
    assert field in str(ei.value) and "/x/config.json" in str(ei.value)


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "vocab_size"])
def test_missing_config_field(tmp_path, field):
    d = MHA.to_hf_dict(5)
    del d[field]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_pretrained(tmp_path)
    msg = str(ei.value)
    assert field in msg and str(tmp_path / "config.json") in msg


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,, }')
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_pretrained(tmp_path)
    assert "not valid JSON" in str(ei.value) and str(tmp_path / "config.json") in str(ei.value)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_pretrained(tmp_path)
    shutil.rmtree(tmp_path)
    with pytest.raises(ConfigError, match="neither a directory"):
        ModelConfig.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- round trip through transformers
@pytest.mark.parametrize("cfg, num_shards, spelling, dtype", [
    (MHA, 1, 4, torch.float32),
    (GQA, 3, 5, torch.float32),
    (TIED, 3, 4, torch.float32),
    (TIED, 1, 5, torch.float32),
    (LINEAR, 1, 5, torch.float32),
    (LINEAR, 3, 4, torch.float32),
    (BF16, 3, 4, torch.bfloat16),
    (BF16, 1, 5, torch.bfloat16),
], ids=["mha-1-v4", "gqa-3-v5", "tied-3-v4", "tied-1-v5", "linear-1-v5", "linear-3-v4", "bf16-3-v4", "bf16-1-v5"])
def test_round_trip_transformers(tmp_path, cfg, num_shards, spelling, dtype):
    d, sd = save(tmp_path, cfg, num_shards, spelling, dtype)
    files = find_weight_files(d)
    assert len(files) == num_shards
    if num_shards > 1:
        index = json.loads((d / INDEX_NAME).read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
        assert set(index["weight_map"]) == set(cfg.weight_shapes())
        sizes = [os.path.getsize(f) for f in files]
        assert max(sizes) < 2.5 * min(sizes), sizes  # balanced by bytes

    # our own reader
    assert ModelConfig.from_pretrained(d) == cfg
    got = collect(d, cfg)
    assert set(got) == set(sd)
    for k in sd:
        assert got[k].dtype == dtype and torch.equal(got[k], sd[k]), k

    # transformers' reader
    model, info = transformers.LlamaForCausalLM.from_pretrained(d, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hc = model.config
    assert (hc.vocab_size, hc.hidden_size, hc.intermediate_size, hc.num_hidden_layers) == (
        cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
    assert (hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim) == (
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert hc.rms_norm_eps == cfg.rms_norm_eps and hc.max_position_embeddings == cfg.max_position_embeddings
    assert hc.rope_parameters["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling_factor != 1.0:
        assert hc.rope_parameters["rope_type"] == "linear" and hc.rope_parameters["factor"] == cfg.rope_scaling_factor
    else:
        assert hc.rope_parameters["rope_type"] == "default"
    assert hc.tie_word_embeddings == cfg.tie_word_embeddings
    assert str(hc.dtype).removeprefix("torch.") == cfg.dtype
    assert (hc.bos_token_id, hc.pad_token_id) == (cfg.bos_token_id, cfg.pad_token_id)
    eos = tuple(hc.eos_token_id) if isinstance(hc.eos_token_id, list) else hc.eos_token_id
    assert eos == cfg.eos_token_id
    hsd = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(hsd[k], v), k
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert torch.equal(hsd["lm_head.weight"], sd["model.embed_tokens.weight"])

    # and what transformers writes back is read by us to the same config
    out = tmp_path / "hf_saved"
    model.save_pretrained(out)
    assert ModelConfig.from_pretrained(out) == cfg
    got2 = collect(out, cfg)
    assert all(torch.equal(got2[k], sd[k]) for k in sd)


def test_random_state_dict_deterministic_and_norms_not_ones():
    a = random_state_dict(GQA, seed=1)
    b = random_state_dict(GQA, seed=1)
    c = random_state_dict(GQA, seed=2)
    assert list(a) == list(GQA.weight_shapes())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], c["model.norm.weight"])
    n = a["model.layers.0.input_layernorm.weight"]
    assert abs(n.mean().item() - 1.0) < 0.1 and n.std().item() > 0.03
    w = a["model.layers.0.mlp.up_proj.weight"]
    assert abs(w.std().item() - 0.02) < 0.005
    bf = random_state_dict(GQA, seed=1, dtype=torch.bfloat16)
    assert torch.equal(bf["lm_head.weight"], a["lm_head.weight"].bfloat16())


def test_tied_checkpoint_with_lm_head_is_accepted(tmp_path):
    # a checkpoint saved untied, read with a tied config: lm_head.weight is ignored, as transformers does
    untied = TIED.replace(tie_word_embeddings=False)
    d, sd = save(tmp_path, untied)
    got = collect(d, TIED)
    assert "lm_head.weight" not in got and set(got) == set(TIED.weight_shapes())


def test_ignored_suffix(tmp_path):
    from safetensors.torch import save_file
    sd = random_state_dict(MHA)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    (tmp_path / "config.json").write_text(json.dumps(MHA.to_hf_dict()))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    got = collect(tmp_path, MHA)
    assert set(got) == set(MHA.weight_shapes())
    with pytest.raises(CheckpointError, match="rotary_emb.inv_freq"):
        collect(tmp_path, MHA, ignore_unexpected=())


# ----------------------------------------------------------------------------- bad inputs
def assert_names(err: BaseException, file: str, tensor: str | None):
    msg = str(err)
    assert os.path.basename(file) in msg, msg
    if tensor is not None:
        assert tensor in msg, msg


def test_missing_shard(tmp_path):
    d, _ = save(tmp_path, GQA, num_shards=3)
    os.remove(d / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError) as ei:
        find_weight_files(d)
    assert_names(ei.value, INDEX_NAME, None)
    assert "model-00002-of-00003.safetensors" in str(ei.value)
    with pytest.raises(CheckpointError, match="model-00002-of-00003"):
        collect(d, GQA)


def test_truncated_shard(tmp_path):
    d, _ = save(tmp_path, GQA, num_shards=3)
    shard = d / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    consumed = []
    with pytest.raises(CheckpointError) as ei:
        load_weights(d, GQA.weight_shapes(), lambda n, t: consumed.append(n), progress=False)
    assert_names(ei.value, str(shard), None)
    assert "truncated" in str(ei.value)
    assert ei.value.tensor is not None and ei.value.tensor in str(ei.value)  # names the first cut tensor
    assert consumed == []  # header problems are found before anything is consumed


def test_corrupt_header(tmp_path):
    d, _ = save(tmp_path, MHA)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError) as ei:
        collect(d, MHA)
    assert_names(ei.value, "model.safetensors", None)


def test_shape_mismatch(tmp_path):
    d, _ = save(tmp_path, GQA, num_shards=3)
    wrong = GQA.replace(num_key_value_heads=4)  # k/v would be (64, 64) instead of (32, 64)
    with pytest.raises(CheckpointError) as ei:
        collect(d, wrong)
    name = "model.layers.0.self_attn.k_proj.weight"
    assert_names(ei.value, "model-00001-of-00003.safetensors", name)
    assert "(64, 64)" in str(ei.value) and "(32, 64)" in str(ei.value)


def test_unexpected_tensor(tmp_path):
    from safetensors.torch import save_file
    sd = random_state_dict(MHA)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    consumed = []
    with pytest.raises(CheckpointError) as ei:
        load_weights(tmp_path, MHA.weight_shapes(), lambda n, t: consumed.append(n), progress=False)
    assert_names(ei.value, "model.safetensors", "model.layers.0.self_attn.q_proj.bias")
    assert consumed == []


def test_extra_layer_is_unexpected(tmp_path):
    d, _ = save(tmp_path, MHA, num_shards=3)
    fewer = MHA.replace(num_hidden_layers=1)
    with pytest.raises(CheckpointError) as ei:
        collect(d, fewer)
    assert "model.layers.1." in str(ei.value) and "unexpected" in str(ei.value)


def test_missing_tensor_single_file(tmp_path):
    from safetensors.torch import save_file
    sd = random_state_dict(MHA)
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as ei:
        collect(tmp_path, MHA)
    assert_names(ei.value, "model.safetensors", "model.layers.1.mlp.down_proj.weight")
    assert "missing" in str(ei.value)


def test_missing_tensor_sharded_names_indexed_shard(tmp_path):
    # the index still lists the tensor, but the shard lacks it -> error names that shard
    from safetensors import safe_open
    from safetensors.torch import save_file
    d, _ = save(tmp_path, GQA, num_shards=3)
    index = json.loads((d / INDEX_NAME).read_text())
    victim = "model.layers.1.self_attn.v_proj.weight"
    shard = d / index["weight_map"][victim]
    with safe_open(str(shard), "pt") as f:
        rest = {k: f.get_tensor(k) for k in f.keys() if k != victim}
    save_file(rest, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as ei:
        collect(d, GQA)
    assert_names(ei.value, shard.name, victim)


def test_index_points_elsewhere_and_duplicates(tmp_path):
    d, _ = save(tmp_path, GQA, num_shards=3)
    index = json.loads((d / INDEX_NAME).read_text())
    victim = "model.embed_tokens.weight"
    index["weight_map"][victim] = "model-00002-of-00003.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as ei:
        collect(d, GQA)
    assert_names(ei.value, "model-00001-of-00003.safetensors", victim)
    assert "model-00002-of-00003.safetensors" in str(ei.value)


def test_duplicate_across_single_files_is_ambiguous(tmp_path):
    from safetensors.torch import save_file
    sd = random_state_dict(MHA)
    save_file(sd, str(tmp_path / "a.safetensors"))
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        find_weight_files(tmp_path)
    os.remove(tmp_path / "b.safetensors")
    assert find_weight_files(tmp_path) == [str(tmp_path / "a.safetensors")]


def test_non_float_dtype(tmp_path):
    from safetensors.torch import save_file
    sd = random_state_dict(MHA)
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.int8)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as ei:
        collect(tmp_path, MHA)
    assert_names(ei.value, "model.safetensors", "model.norm.weight")
    assert "I8" in str(ei.value)


class _Boom:
    """Unpickling this object creates a marker file (i.e. runs code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(MHA.to_hf_dict()))
    for name in ("pytorch_model.bin", "consolidated.00.pth"):
        (d / name).write_bytes(pickle.dumps(_Boom(str(marker))))
    # sanity: the payload really would run if unpickled
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Boom(str(probe)))).close()
    assert probe.exists()

    for call in (lambda: find_weight_files(d), lambda: collect(d, MHA)):
        with pytest.raises(CheckpointError) as ei:
            call()
        msg = str(ei.value)
        assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg and str(d) in msg
        assert "save_file" in msg
    assert not marker.exists()


def test_missing_directory(tmp_path):
    d = tmp_path / "nope"
    for call in (lambda: find_weight_files(d), lambda: collect(d, MHA)):
        with pytest.raises(CheckpointError) as ei:
            call()
        assert "does not exist" in str(ei.value) and str(d) in str(ei.value)
    with pytest.raises(ConfigError, match="nope"):
        ModelConfig.from_pretrained(d)


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no weights found"):
        find_weight_files(tmp_path)


def test_save_checkpoint_validates_state_dict(tmp_path):
    sd = random_state_dict(MHA)
    sd["model.norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        save_checkpoint(tmp_path / "x", MHA, sd)
    sd = random_state_dict(MHA)
    del sd["lm_head.weight"]
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        save_checkpoint(tmp_path / "x", MHA, sd)


def test_errors_are_value_errors():
    assert issubclass(CheckpointError, ValueError) and issubclass(ConfigError, CheckpointError)
    assert set(BUILTIN_CONFIGS) == {"selfrag-7b", "selfrag-13b"}
