"""``LLM(..., quantization="int8" / "fp8")``: the engine with weight-only 8-bit matrices against
HF transformers running the same quantized weights (dequantized by this test's own
code, from the format's written definition), on the reference backend and on the
Triton kernels (interpreter on CPU)."""
import pytest
import torch

from engine import SamplingParams
from engine.model.quantized_weights import QuantizedWeight
from tests.helpers import DEVICE, hf_greedy, hf_model, make_checkpoint, make_llm, token_prompts

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fake_quantize(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-row int8, rounded half away from zero, back to fp32 on w's
    device (the format as the README states it, written out independently of kernels/).
    Computed on the CPU, whose division is IEEE on every machine: CUDA torch divides by a
    Python scalar as a multiply by its reciprocal, another scale on ~4.5% of rows."""
    dev, w = w.device, w.detach().cpu().double()
    s = (w.abs().max(dim=1).values.float() / 127.0).double()      # the scale is an fp32 number
    safe = torch.where(s == 0, torch.ones_like(s), s)
    y = (w / safe[:, None]).float().double()
    q = torch.sign(y) * torch.clamp(torch.floor(y.abs() + 0.5), max=127)
    return (q * s[:, None]).float().to(dev)


def fake_quantize_fp8(w: torch.Tensor) -> torch.Tensor:
    """Per-output-row scale max|w| / 448, values rounded to float8 e4m3 (torch's cast:
    nearest, ties to even), back to fp32 on w's device (computed on the CPU, as above)."""
    dev, w = w.device, w.detach().cpu().float()
    s = w.abs().max(dim=1).values / 448.0
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return ((w / safe[:, None]).to(torch.float8_e4m3fn).float() * s[:, None]).to(dev)


def hf_int8(path, quantize=fake_quantize):
    hf = hf_model(path)
    with torch.no_grad():
        for layer in hf.model.layers:
            for mod in (layer.self_attn, layer.mlp):
                for name in LINEARS:
                    lin = getattr(mod, name, None)
                    if lin is not None:
                        lin.weight.copy_(quantize(lin.weight))
    return hf


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_int8_greedy_matches_hf_on_the_same_quantized_weights(tmp_path, kv_heads):
    cfg = make_checkpoint(tmp_path, num_key_value_heads=kv_heads, std=0.1)
    prompts = token_prompts(3, cfg.vocab_size, seed=7, min_len=4, max_len=40)
    llm = make_llm(str(tmp_path), show_progress=False, quantization="int8", block_size=8)
    new = 16
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, logprobs=2),
                        use_tqdm=False)
    hf = hf_int8(tmp_path)
    plain = hf_model(tmp_path)
    for p, o in zip(prompts, outs):
        ref, rows = hf_greedy(hf, p, new)
        assert o.outputs[0].token_ids == ref
        for step, t in enumerate(ref):
            assert o.outputs[0].logprobs[step][t].logprob == pytest.approx(float(rows[step][t]), abs=1e-3)
    # the quantization is real: the unquantized model's logits differ (tokens may not)
    x = torch.tensor([prompts[0]], device=DEVICE)
    assert not torch.allclose(hf(x).logits, plain(x).logits, atol=1e-4)


def test_int8_matrices_and_their_bytes(tmp_path):
    cfg = make_checkpoint(tmp_path)
    q = make_llm(str(tmp_path), show_progress=False, quantization="int8")
    f = make_llm(str(tmp_path), show_progress=False)
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    mats = [((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D, H), (H, cfg.num_attention_heads * D),
            (2 * I, H), (H, I)]
    per_layer_fp = sum(n * k for n, k in mats) * 4
    per_layer_int8 = sum(n * k + 4 * n for n, k in mats)
    for layer in q.model.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            w = getattr(layer, name)
            assert isinstance(w, QuantizedWeight) and w.qweight.dtype == torch.int8
    assert f.model.num_bytes() - q.model.num_bytes() == cfg.num_hidden_layers * (per_layer_fp - per_layer_int8)
    assert q.model.embed.dtype == q.model.lm_head.dtype == torch.float32     # not quantized


def test_each_checkpoint_tensor_is_quantized_on_its_own_rows(tmp_path):
    """q/k/v and gate/up fill rows of fused matrices: the int8 rows and scales equal
    those of each HF tensor quantized alone."""
    import glob

    from safetensors.torch import load_file
    make_checkpoint(tmp_path, num_key_value_heads=2)
    llm = make_llm(str(tmp_path), show_progress=False, quantization="int8")
    sd = {}
    for f in glob.glob(str(tmp_path / "*.safetensors")):
        sd.update(load_file(f))
    layer = llm.model.layers[1]
    qkv = torch.cat([sd[f"model.layers.1.self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
    assert torch.allclose(layer.qkv.dequantize().cpu(), fake_quantize(qkv), rtol=0, atol=1e-7)
    gu = torch.cat([sd[f"model.layers.1.mlp.{n}.weight"] for n in ("gate_proj", "up_proj")])
    assert torch.allclose(layer.gate_up.dequantize().cpu(), fake_quantize(gu), rtol=0, atol=1e-7)


def test_dummy_int8_weights_are_the_dummy_fp_weights_quantized(tmp_path):
    """load_format="dummy" (the GPU benchmarks' 7B): int8 is the fp model's draw quantized,
    so int8-vs-fp16 timings compare the same model."""
    from engine.model.loader import load_model
    make_checkpoint(tmp_path)
    fp, _ = load_model(str(tmp_path), load_format="dummy", seed=3, device=DEVICE, progress=False)
    q, _ = load_model(str(tmp_path), load_format="dummy", seed=3, device=DEVICE, progress=False,
                      quantization="int8")
    for name in ("qkv", "down"):
        assert torch.allclose(getattr(q.layers[1], name).dequantize(), fake_quantize(getattr(fp.layers[1], name)),
                              rtol=0, atol=1e-7)
    assert torch.equal(q.embed, fp.embed) and torch.equal(q.lm_head, fp.lm_head)


def test_triton_kernels_give_the_reference_int8_tokens(tmp_path):
    """The whole int8 engine on the Triton backend (interpreter on CPU): decode steps run
    the split-K kernel in 16-row tiles, the two 20-24-token prompts (one prefill) in
    64-row tiles. (The dequantize path of longer prefills: tests/test_triton_w8a16.py.)"""
    cfg = make_checkpoint(tmp_path, num_key_value_heads=2)
    prompts = token_prompts(2, cfg.vocab_size, seed=4, min_len=20, max_len=24)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = make_llm(str(tmp_path), show_progress=False, quantization="int8", kernel_backend="torch")
    tri = make_llm(str(tmp_path), show_progress=False, quantization="int8", kernel_backend="triton", block_size=8)
    a = ref.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    b = tri.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert [o.outputs[0].cumulative_logprob for o in b] == pytest.approx(
        [o.outputs[0].cumulative_logprob for o in a], abs=1e-3)


@pytest.mark.parametrize("value", ["awq", "gptq", "FP8", "INT8", 8])
def test_unimplemented_quantizations_are_clear_errors(tmp_path, value):
    make_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"quantization=.*is not supported.*'int8', 'fp8'"):
        make_llm(str(tmp_path), show_progress=False, quantization=value)


def test_padded_graph_buffers_give_the_eager_int8_tokens(tmp_path):
    """What a CUDA graph replays, run eagerly on CPU: the Triton int8 GEMV over the
    padded static decode buffers (padding rows included) gives the eager tokens."""
    from engine.worker.cuda_graphs import DecodeRunner
    cfg = make_checkpoint(tmp_path, num_key_value_heads=2)
    prompts = token_prompts(3, cfg.vocab_size, seed=8)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eager = make_llm(str(tmp_path), show_progress=False, quantization="int8", block_size=8, max_model_len=128)
    want = [o.outputs[0].token_ids for o in eager.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                           use_tqdm=False)]
    llm = make_llm(str(tmp_path), show_progress=False, quantization="int8", block_size=8, max_model_len=128,
                   max_num_seqs=6, kernel_backend="triton")
    llm.decode_runner = DecodeRunner(llm.model, llm.runner.kv_caches, 8, 6, 128, num_splits=lambda b: 2,
                                     pad_to_buckets=True)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                        use_tqdm=False)]
    assert got == want


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and GPU memory: GPU check only")
def test_cuda_graphs_and_streaming_load_on_the_gpu(tmp_path):
    """Graph replay gives the eager int8 tokens; loading never holds the model in full
    precision on the GPU (peak: the int8 model plus about one fp32 tensor)."""
    cfg = make_checkpoint(tmp_path, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=8)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    from engine.model.loader import load_model
    model, _ = load_model(str(tmp_path), dtype="float16", device="cuda", progress=False, quantization="int8")
    peak = torch.cuda.max_memory_allocated() - base
    largest = max(2 * cfg.intermediate_size * cfg.hidden_size, cfg.vocab_size * cfg.hidden_size) * 4
    per_layer = sum(n * k for n, k in [(3 * 512, 512), (512, 512), (2 * 1536, 512), (512, 1536)])
    fp_bytes = per_layer * cfg.num_hidden_layers * 2          # the layers' matrices in fp16
    assert peak <= model.num_bytes() + 2 * largest and peak < fp_bytes, (peak, model.num_bytes())
    del model
    prompts = token_prompts(4, cfg.vocab_size, seed=9)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = []
    for eager in (True, False):
        llm = make_llm(str(tmp_path), show_progress=False, quantization="int8", dtype=torch.float16,
                       enforce_eager=eager)
        assert llm.cuda_graphs["enabled"] != eager
        outs.append([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                  sp, use_tqdm=False)])
        del llm
    assert outs[0] == outs[1]


def test_fp8_greedy_matches_hf_on_the_same_quantized_weights(tmp_path):
    cfg = make_checkpoint(tmp_path, num_key_value_heads=2, std=0.1)
    prompts = token_prompts(3, cfg.vocab_size, seed=17, min_len=4, max_len=30)
    llm = make_llm(str(tmp_path), show_progress=False, quantization="fp8", block_size=8)
    assert llm.model.layers[0].qkv.qweight.dtype == torch.float8_e4m3fn
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1), use_tqdm=False)
    hf = hf_int8(tmp_path, fake_quantize_fp8)
    for p, o in zip(prompts, outs):
        ref, rows = hf_greedy(hf, p, 12)
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].logprobs[5][ref[5]].logprob == pytest.approx(float(rows[5][ref[5]]), abs=1e-3)
    x = torch.tensor([prompts[0]], device=DEVICE)
    assert not torch.allclose(hf(x).logits, hf_int8(tmp_path)(x).logits, atol=1e-4)    # not int8's


def test_fp8_triton_kernels_give_the_reference_tokens(tmp_path):
    cfg = make_checkpoint(tmp_path, num_key_value_heads=2)
    prompts = token_prompts(2, cfg.vocab_size, seed=5, min_len=8, max_len=12)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    runs = [make_llm(str(tmp_path), show_progress=False, quantization="fp8", kernel_backend=b).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False) for b in ("torch", "triton")]
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]


def test_fp8_on_a_gpu_older_than_sm89_is_refused(monkeypatch):
    from engine.model.quantized_weights import check_device
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer.*8\.0.*'int8'"):
        check_device("fp8", torch.device("cuda"))
    check_device("int8", torch.device("cuda"))          # int8 runs on sm_80
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device("fp8", torch.device("cuda"))
