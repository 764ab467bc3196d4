"""Triton element-wise / row kernels vs. the PyTorch references, in Triton's interpreter.

Covers kernels/triton/{norm,activation,rope_kv,sampling}.py: fp32 / fp16 / bf16, odd
shapes, strided views, padding slots, argmax ties and NaNs, plus an offline sm_90
compile of every production compile spec (no register spills).

Tolerances: fp32 results are held to ~1 ulp. fp16 / bf16 results may differ from the
reference by about an ulp because the kernels compute in fp32 and round once where
the reference rounds after each torch op. bf16 gets a wider bound because Triton's
interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest even), which
adds up to one more bf16 ulp; fp16 conversions in the interpreter are exact RNE.
"""
import dataclasses

import pytest
import torch

from kernels import reference as R
from kernels.triton import activation, norm, rope_kv, sampling
from tests.helpers import DEVICE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)


# ---------------------------------------------------------------- rms_norm -------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 64), (3, 96), (7, 64)])
def test_rms_norm(dtype, T, H):
    x = _randn(T, H, dtype=dtype, seed=T * H, scale=3.0)
    w = _randn(H, dtype=dtype, seed=1) * 0.5 + 1.0
    out = norm.rms_norm(x, w, 1e-5)
    ref = R.rms_norm(x, w, 1e-5)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, ref, **tol)


def test_rms_norm_hidden_4096_and_strided_rows():
    H = 4096
    big = _randn(2, H + 64, dtype=torch.float16, seed=5, scale=2.0)
    x = big[:, :H]                                   # row stride H + 64
    w = _randn(H, dtype=torch.float16, seed=6) * 0.1 + 1.0
    torch.testing.assert_close(norm.rms_norm(x, w, 1e-6), R.rms_norm(x, w, 1e-6),
                               **TOL[torch.float16])
    x32, w32 = x.float(), w.float()
    torch.testing.assert_close(norm.rms_norm(x32, w32, 1e-6), R.rms_norm(x32, w32, 1e-6),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 96), (3, 64), (7, 96)])
def test_fused_add_rms_norm_in_place(dtype, T, H):
    x = _randn(T, H, dtype=dtype, seed=T + H)
    res = _randn(T, H, dtype=dtype, seed=T + H + 1, scale=4.0)
    w = _randn(H, dtype=dtype, seed=2) * 0.5 + 1.0
    ref_out, ref_res = R.fused_add_rms_norm(x, res.clone(), w, 1e-5)
    x_before = x.clone()
    out, new_res = norm.fused_add_rms_norm(x, res, w, 1e-5)
    assert new_res is res                            # the sum is written in place
    assert torch.equal(x, x_before)
    if dtype == torch.bfloat16:                      # interpreter truncates to bf16 (1 ulp)
        torch.testing.assert_close(new_res, ref_res, rtol=8e-3, atol=8e-3)
    else:                                            # the rounded sum is exactly torch's
        assert torch.equal(new_res, ref_res)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, ref_out, **tol)


# ---------------------------------------------------------------- silu_and_mul ---------

@pytest.mark.parametrize("dtype,T,I", [(d, T, 160) for d in DTYPES for T in (1, 3, 7)]
                         + [(torch.float16, 2, 11008)])          # the Llama-7B width, once
def test_silu_and_mul(dtype, T, I):
    gu = _randn(T, 2 * I, dtype=dtype, seed=I + T, scale=3.0)
    out = activation.silu_and_mul(gu)
    assert out.shape == (T, I) and out.dtype == dtype
    torch.testing.assert_close(out, R.silu_and_mul(gu), **TOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # exp(1e30) = inf: intended
def test_silu_and_mul_strided_rows_and_extremes():
    buf = _randn(3, 2 * 160 + 32, seed=9, scale=4.0)
    buf[0, :4] = torch.tensor([-100.0, 100.0, -1e30, 0.0])
    gu = buf[:, : 2 * 160]                            # row stride 352
    torch.testing.assert_close(activation.silu_and_mul(gu), R.silu_and_mul(gu), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- rope + KV write ------

def _qkv_views(buf, T, Hq, Hkv, D):
    q, k, v = buf[:, : (Hq + 2 * Hkv) * D].split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    return q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)


def _run_rope(fn, buf, T, Hq, Hkv, D, cos, sin, caches, slots, fused=True):
    buf = buf.clone()
    kc, vc = caches[0].clone(), caches[1].clone()
    if fused:
        q, k, v = _qkv_views(buf, T, Hq, Hkv, D)
    else:                                            # three separate contiguous tensors
        q, k, v = [t.contiguous() for t in _qkv_views(buf, T, Hq, Hkv, D)]
    fn(q, k, v, cos, sin, kc, vc, slots)
    return q, k, v, kc, vc


@pytest.mark.parametrize(
    "dtype,T,Hq,Hkv,D,pad",
    [(d, *cfg) for d in DTYPES for cfg in ((1, 4, 2, 16, 0), (3, 4, 2, 32, 8), (7, 4, 2, 64, 0))]
    + [(d, 3, 32, 8, 128, 0) for d in (torch.float16, torch.bfloat16)])   # real GQA head counts
def test_rope_and_write_kv_fused_qkv(dtype, T, Hq, Hkv, D, pad):
    bs, nb = 16, 5
    width = (Hq + 2 * Hkv) * D + pad                 # pad: qkv rows wider than q|k|v
    buf = _randn(T, width, dtype=dtype, seed=T * D, scale=2.0)
    cos_t, sin_t = R.rope_cos_sin(4096, D, 10000.0, 1.0, dtype=dtype)
    pos = torch.tensor([4095, 0, 1, 17, 1000, 2048, 4094][:T])
    cos, sin = cos_t[pos], sin_t[pos]
    slots = torch.tensor([5, -1, 79, 16, 33, -1, 0][:T], dtype=torch.int64)
    if T == 1:
        slots = torch.tensor([47], dtype=torch.int64)
    sentinel = torch.full((nb, bs, Hkv, D), 7.0, dtype=dtype)
    caches = (sentinel, sentinel.clone())
    ref = _run_rope(R.rope_and_write_kv, buf, T, Hq, Hkv, D, cos, sin, caches, slots)
    got = _run_rope(rope_kv.rope_and_write_kv, buf, T, Hq, Hkv, D, cos, sin, caches, slots)
    for name, a, b in zip(("q", "k"), got[:2], ref[:2]):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    assert torch.equal(got[2], ref[2])               # v untouched
    torch.testing.assert_close(got[3], ref[3], **TOL[dtype])
    assert torch.equal(got[4], ref[4])               # v copied bit for bit, padding skipped
    # cells of slots not written stay untouched; the written k cells equal the rotated k
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    kflat, vflat = got[3].view(nb * bs, Hkv, D), got[4].view(nb * bs, Hkv, D)
    assert bool((kflat[~written] == 7.0).all()) and bool((vflat[~written] == 7.0).all())
    keep = slots >= 0
    assert torch.equal(kflat[slots[keep]], got[1][keep])
    assert torch.equal(vflat[slots[keep]], got[2][keep])


def test_rope_and_write_kv_separate_tensors_and_scaling():
    """q, k, v not adjacent in memory; linear rope scaling; fp32 accuracy vs fp64."""
    T, Hq, Hkv, D = 3, 4, 2, 32
    buf = _randn(T, (Hq + 2 * Hkv) * D, seed=3)
    cos_t, sin_t = R.rope_cos_sin(4096, D, 10000.0, 2.0)
    pos = torch.tensor([4095, 3, 100])
    slots = torch.tensor([2, 3, -1])
    caches = (torch.zeros(2, 16, Hkv, D), torch.zeros(2, 16, Hkv, D))
    ref = _run_rope(R.rope_and_write_kv, buf, T, Hq, Hkv, D, cos_t[pos], sin_t[pos], caches, slots,
                    fused=False)
    got = _run_rope(rope_kv.rope_and_write_kv, buf, T, Hq, Hkv, D, cos_t[pos], sin_t[pos], caches,
                    slots, fused=False)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # against fp64 HF arithmetic
    q64 = _qkv_views(buf, T, Hq, Hkv, D)[0].double()
    c, s = cos_t[pos].double()[:, None], sin_t[pos].double()[:, None]
    rot = torch.cat([-q64[..., D // 2:], q64[..., : D // 2]], -1)
    torch.testing.assert_close(got[0].double(), q64 * c + rot * s, rtol=1e-6, atol=1e-6)


def test_rope_and_write_kv_validation():
    T, Hq, Hkv, D = 2, 4, 2, 16
    buf = torch.zeros(T, (Hq + 2 * Hkv) * D)
    q, k, v = _qkv_views(buf, T, Hq, Hkv, D)
    cos = sin = torch.zeros(T, D)
    kc = vc = torch.zeros(2, 16, Hkv, D)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_kv.rope_and_write_kv(q, k, v, cos, sin, kc, vc, torch.zeros(T, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_cache"):
        rope_kv.rope_and_write_kv(q, k, v, cos, sin, kc.half(), vc, torch.zeros(T, dtype=torch.int64))
    with pytest.raises(ValueError, match="cos"):
        rope_kv.rope_and_write_kv(q, k, v, cos[:1], sin, kc, vc, torch.zeros(T, dtype=torch.int64))
    with pytest.raises(ValueError, match="q"):
        rope_kv.rope_and_write_kv(q.transpose(1, 2), k, v, cos, sin, kc, vc,
                                  torch.zeros(T, dtype=torch.int64))


def test_row_kernel_validation():
    with pytest.raises(ValueError, match="weight"):
        norm.rms_norm(torch.zeros(2, 8), torch.zeros(4), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        norm.fused_add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8).half(), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="x"):
        norm.rms_norm(torch.zeros(8, 2).t(), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="gate_up"):
        activation.silu_and_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="token_ids"):
        sampling.gather_logprobs(torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="logits"):
        sampling.greedy_argmax(torch.zeros(8, dtype=torch.float32))


# ---------------------------------------------------------------- sampling -------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_argmax_ties_nan_inf(dtype):
    V = 320
    logits = torch.randint(-3, 4, (7, V), generator=_gen(4)).to(dtype)    # many ties
    logits[1] = 0.0
    logits[2, 5] = logits[2, 300] = 50.0
    logits[3] = float("-inf")
    logits[4, 17] = logits[4, 250] = float("nan")
    logits[5, V - 1] = 99.0
    logits[6, 0] = 99.0
    out = sampling.greedy_argmax(logits)
    ref = torch.argmax(logits, dim=-1)
    assert out.dtype == torch.int64
    assert torch.equal(out, ref), (out, ref)
    assert out[:7].tolist()[1:7] == [0, 5, 0, 17, V - 1, 0]


def test_greedy_argmax_vocab_32016_across_chunks():
    V = 32016
    logits = _randn(4, V, seed=11)
    logits[0, 5000] = logits[0, 70] = 30.0          # tie in two chunks -> the earlier
    logits[1, 4096] = logits[1, 30000] = 30.0
    logits[2, V - 1] = 30.0                          # in the masked last chunk
    logits[3, 8191] = logits[3, 8192] = 30.0         # tie across a chunk boundary
    wide = torch.zeros(4, V + 16)
    wide[:, :V] = logits
    out = sampling.greedy_argmax(wide[:, :V])       # row stride V + 16
    assert out.tolist() == [70, 4096, V - 1, 8191]
    assert torch.equal(out, R.greedy_argmax(logits))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K", [(1, 1), (3, 16), (7, 1)])
def test_gather_logprobs(dtype, N, K):
    V = 320
    logits = _randn(N, V, seed=N * K, scale=5.0).to(dtype)
    ids = torch.randint(0, V, (N, K), generator=_gen(K))
    if K >= 4:
        ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3] = 0, V - 1, 7, 7    # edges + duplicates
    out = sampling.gather_logprobs(logits, ids)
    assert out.dtype == torch.float32 and out.shape == (N, K)
    torch.testing.assert_close(out, R.gather_logprobs(logits, ids), rtol=1e-5, atol=2e-5)


def test_gather_logprobs_vocab_32016_and_extremes():
    V = 32016
    logits = _randn(3, V, seed=21, scale=8.0)
    logits[1, :5000] = float("-inf")                 # whole first chunk -inf
    logits[2, 31999] = 80.0                          # dominant logit in the ragged last chunk
    ids = torch.tensor([[0, V - 1, 31999, 31999, 5000, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]] * 3)
    ids_t = ids.t().contiguous().t()                 # column-major ids: non-unit id stride
    out = sampling.gather_logprobs(logits, ids_t)
    torch.testing.assert_close(out, R.gather_logprobs(logits, ids), rtol=1e-5, atol=2e-5,
                               equal_nan=True)
    assert bool(torch.isneginf(out[1, 0]))


# ---------------------------------------------------------------- offline compile ------

# The offline sm_80/sm_90 compile of compile_specs (fp16 and bf16, no spills) is the
# report's gate: tests/test_kernel_report.py.


def test_compile_specs_match_launcher_choices():
    """The specs describe the configs the launchers pick (checked on the 7B shape)."""
    from kernels.triton.common import SHAPES
    shape = SHAPES[0]
    (rms, fused) = norm.compile_specs(shape)
    assert rms.constexprs["BLOCK"] == 4096 and rms.num_warps == norm._config(4096)[1]
    assert activation.compile_specs(shape)[0].constexprs["BLOCK"] == activation._config(11008)[0]
    r = rope_kv.compile_specs(shape)[0]
    assert (r.constexprs["BLOCK_H"], r.constexprs["BLOCK_HALF"], r.num_warps) == \
        rope_kv._config(32, 32, 128)
    assert r.signature["q_ptr"] == "*fp16" and r.signature["slot_ptr"] == "*i64"
    bf = dataclasses.replace(shape, dtype="bf16")
    assert norm.compile_specs(bf)[0].signature["x_ptr"] == "*bf16"
    prod = [s for s in sampling.compile_specs(shape) if s.production]
    assert all(s.signature["logits_ptr"] == "*fp32" for s in prod)
    for spec in (rms, fused, r, *prod):
        for name, ty in spec.signature.items():
            assert (ty == "constexpr") == (name in spec.constexprs), (spec.name, name)
