"""Which matmul each projection runs: the measured GEMV table (kernels/gemv_table.json)
decides, by lookup; without an entry everything stays on cuBLAS / w8a16, and with one the
decode GEMV gives the reference's tokens. On CPU the Triton kernels run in the interpreter,
whose table device is 'cpu'."""
import json

import pytest

from engine import LLM, SamplingParams
from kernels.ops import gemv_max_rows
from tests.helpers import make_checkpoint


def _table(tmp_path, devices):
    path = tmp_path / "gemv_table.json"
    path.write_text(json.dumps({"format": 1, "devices": devices}))
    return str(path)


def test_lookup_reads_the_entry_and_defaults_to_none(tmp_path):
    path = _table(tmp_path, {"NVIDIA H200": {"fp16": {"12288x4096": 16, "4096x4096": 4}}})
    assert gemv_max_rows("NVIDIA H200", "fp16", 12288, 4096, path) == 16
    assert gemv_max_rows("NVIDIA H200", "fp16", 4096, 4096, path) == 4
    assert gemv_max_rows("NVIDIA H200", "int8", 4096, 4096, path) == 0
    assert gemv_max_rows("NVIDIA H100 80GB HBM3", "fp16", 4096, 4096, path) == 0
    assert gemv_max_rows("NVIDIA H200", "fp16", 1, 1, str(tmp_path / "absent.json")) == 0
    with pytest.raises(ValueError, match=r"4096x4096'\] must be an int in \[0, 16\]"):
        gemv_max_rows("x", "fp16", 4096, 4096, _table(tmp_path, {"x": {"fp16": {"4096x4096": 17}}}))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        gemv_max_rows("x", "fp16", 1, 1, str(tmp_path / "bad.json"))


def test_the_shipped_table_is_valid_and_names_no_cpu():
    from kernels.ops import GEMV_TABLE
    data = json.load(open(GEMV_TABLE))
    assert data["format"] == 1 and "cpu" not in data["devices"]


@pytest.mark.parametrize("backend,quantization", [("torch", None), ("torch", "int8"), ("triton", None)])
def test_a_table_entry_routes_decode_through_the_gemv_with_the_same_tokens(tmp_path, backend, quantization):
    """A model whose every matrix the table gives to the GEMV decodes the tokens of one
    with no entry (BLAS): through the reference op, and through the Triton kernel in the
    interpreter."""
    path = str(tmp_path / "ckpt")
    make_checkpoint(path, num_key_value_heads=2)
    kw = dict(max_num_seqs=2, num_kv_blocks=16, max_model_len=64, seed=0, quantization=quantization)
    ref = LLM(path, kernel_backend="torch", **kw)
    llm = LLM(path, kernel_backend=backend, **kw)
    assert set(llm.model.gemv_rows.values()) == {0} and "everywhere" in llm.model.gemv_note
    shapes = llm.model.matrix_shapes()
    entries = {"fp32": {f"{N}x{K}": 16 for N, K in shapes.values()}}
    if quantization:
        entries[quantization] = {f"{N}x{K}": 16 for name, (N, K) in shapes.items() if name != "lm_head"}
    entries[quantization or "fp32"]["silu_mul:{}x{}".format(*shapes["down"])] = 16     # the fused down
    llm.model.select_gemv(_table(tmp_path, {"cpu": entries}))
    assert set(llm.model.gemv_rows.values()) == {16} and "ours for qkv" in llm.model.gemv_note
    calls = {"gemv": [], "silu_mul_gemv": []}
    real = {name: getattr(llm.model.ops, name) for name in calls}
    for name in calls:
        setattr(llm.model.ops, name, lambda *a, _n=name, **k: calls[_n].append(a[0].shape[0]) or real[_n](*a, **k))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        prompts = [{"prompt_token_ids": [5, 9, 2, 7]}]
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        want = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    finally:
        for name in calls:
            setattr(llm.model.ops, name, real[name])
    assert got == want
    layers, steps = llm.config.num_hidden_layers, 3
    # every step: qkv, o, gate_up per layer and the head through gemv, down fused
    assert len(calls["gemv"]) == steps * (3 * layers + 1) and len(calls["silu_mul_gemv"]) == steps * layers
    assert max(calls["gemv"] + calls["silu_mul_gemv"]) <= 16
