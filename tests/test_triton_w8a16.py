"""The int8 weight kernels (kernels/triton/w8a16.py) vs the PyTorch references, in
Triton's interpreter on CPU (compiled on a GPU).

Tolerances: quantization is bit-exact (fp32 math, IEEE division, the same rounding
rule). The split-K kernel (M <= 256) multiplies int8 values, exact in fp16/bf16, by the
activations and sums in fp32 like the reference, so only the summation order differs:
fp32 outputs within 1e-5 relative, fp16 within an fp16 ulp of the output. The M > 256
path dequantizes to the activation dtype first (one rounding of each weight to fp16),
so it is held to fp16's relative precision. bf16 dots run only on a GPU (the
interpreter's bf16 tl.dot is wrong).
"""
import itertools

import pytest
import torch

from kernels import reference as R
from kernels.triton import w8a16
from kernels.triton.common import SHAPES
from tests.helpers import DEVICE


def _w(N, K, seed=0, dtype=torch.float16, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g) * scale).to(dtype).to(DEVICE)


def _quantized(N, K, seed=0, fmt="int8"):
    q = torch.empty(N, K, dtype=torch.int8 if fmt == "int8" else torch.float8_e4m3fn, device=DEVICE)
    s = torch.empty(N, dtype=torch.float32, device=DEVICE)
    (R.quantize_int8 if fmt == "int8" else R.quantize_fp8)(_w(N, K, seed), q, s)
    return q, s


def test_reference_quantization_by_hand():
    w = torch.tensor([[0.5, -1.27, 0.0, 0.005], [0.0, 0.0, 0.0, 0.0], [2.54, 1.27, -0.0127, 0.00635]])
    q = torch.empty(3, 4, dtype=torch.int8)
    s = torch.empty(3)
    R.quantize_int8(w, q, s)
    # row 0: scale 1.27 / 127 = 0.01 -> 50, -127, 0, 0.5 (rounds away from zero) -> 1
    assert torch.allclose(s, torch.tensor([0.01, 0.0, 0.02]))
    assert q.tolist() == [[50, -127, 0, 1], [0, 0, 0, 0], [127, 64, -1, 0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 100), (33, 1030), (64, 4096), (16, 11008)])
def test_quantize_is_bit_exact(dtype, N, K):
    """Odd shapes and rows of the 7B's real widths (K = 4096, 11008), zero rows and ties."""
    w = _w(N, K, seed=N + K, dtype=dtype)
    if N > 3:
        w[2] = 0
        w[3, :4] = torch.tensor([1.27, 0.005, -0.005, 0.015], dtype=dtype)   # exact halves of 0.01
    q1 = torch.empty(N, K, dtype=torch.int8, device=DEVICE)
    s1 = torch.empty(N, device=DEVICE)
    q2, s2 = torch.full_like(q1, 99), torch.full_like(s1, -1.0)
    R.quantize_int8(w, q1, s1)
    w8a16.quantize_int8(w, q2, s2)
    assert torch.equal(s1, s2) and torch.equal(q1, q2)
    assert (q1.abs().amax(1)[s1 > 0] == 127).all()


def _rows_where_reciprocal_differs(divisor: float, n: int = 64):
    """(row maxima, their IEEE quotients by ``divisor``) for rows where multiplying by the
    rounded reciprocal (what CUDA torch does for a Python-scalar divisor, and close to
    the approximate division a plain Triton `/` compiles to) gives another fp32 number."""
    import numpy as np
    a = (np.random.default_rng(0).random(20000) * 0.1 + 1e-3).astype(np.float32)
    exact = a / np.float32(divisor)
    differ = exact != a * (np.float32(1.0) / np.float32(divisor))
    assert differ.mean() > 0.02                 # the hazard is real (int8: ~4.5% of rows)
    return torch.from_numpy(a[differ][:n]), torch.from_numpy(exact[differ][:n])


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_scales_are_ieee_quotients_on_every_device(fmt):
    """The scales are max|w| / 127 (fp8: / 448) correctly rounded, on the rows where a
    multiply by the reciprocal would round otherwise: the reference, the Triton kernel
    and the CPU all agree bit for bit (on CUDA too, where the GPU check runs this)."""
    amax, want = _rows_where_reciprocal_differs(127.0 if fmt == "int8" else 448.0)
    w = torch.zeros(len(amax), 40)
    w[:, 7], w[:, 30] = amax, -0.5 * amax
    w = w.to(DEVICE)
    qdt = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
    fns = [R.quantize_int8, w8a16.quantize_int8] if fmt == "int8" else [R.quantize_fp8]
    for quantize in fns:
        q, s = torch.empty(w.shape, dtype=qdt, device=DEVICE), torch.empty(len(amax), device=DEVICE)
        quantize(w, q, s)
        assert torch.equal(s.cpu(), want), quantize
        assert (q.float()[:, 7] == (127.0 if fmt == "int8" else 448.0)).all()


def test_quantize_into_row_views_of_a_fused_matrix():
    """q/k/v land in rows of one qkv matrix: each quantized on its own rows."""
    q = torch.zeros(48, 64, dtype=torch.int8, device=DEVICE)
    s = torch.zeros(48, device=DEVICE)
    parts = [_w(16, 64, seed=i) for i in range(3)]
    for i, p in enumerate(parts):
        w8a16.quantize_int8(p, q[16 * i:16 * (i + 1)], s[16 * i:16 * (i + 1)])
    q_ref, s_ref = torch.empty_like(q), torch.empty_like(s)
    R.quantize_int8(torch.cat(parts), q_ref, s_ref)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def _check_linear(M, N, K, dtype, split=None, seed=0, fmt="int8"):
    q, s = _quantized(N, K, seed, fmt)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
    ref = R.w8a16_linear(x, q, s).float()
    out = w8a16.w8a16_linear(x, q, s, split=split)
    assert out.dtype == dtype and out.shape == (M, N)
    exact = (x.float() @ q.float().t()) * s            # the unrounded fp32 result
    if dtype == torch.float32:
        tol = 1e-5 * exact.abs().max().item() + 1e-6
    elif M <= w8a16.MAX_KERNEL_ROWS:
        tol = exact.abs().max().item() * 2 ** -10      # an fp16 ulp at the largest output
    else:
        tol = exact.abs().max().item() * 2 ** -8       # + the dequantized weights' fp16 rounding
    assert (out.float() - ref).abs().max().item() <= tol
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K", [(1, 1, 16), (1, 37, 100), (3, 64, 1030), (16, 100, 257), (5, 130, 520),
                                   (17, 70, 300), (40, 64, 200), (100, 96, 130)])
def test_kernel_odd_shapes_every_tile_and_split(dtype, M, N, K):
    """Row tiles of 16, 32 and 64 (several of them at M = 100), ragged edges everywhere."""
    block_k = w8a16._matmul_config(M, N, K, dtype)[2]
    steps = -(-K // block_k)
    for split in sorted({None, 1, steps, max(1, steps // 2)}, key=str):
        _check_linear(M, N, K, dtype, split)


@pytest.mark.parametrize("M", [257, 300])
def test_more_than_256_rows_dequantize_then_matmul(M):
    _check_linear(M, 96, 200, torch.float16)
    _check_linear(M, 96, 200, torch.float32)


@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (16, 4096, 11008), (64, 4096, 4096)])
def test_kernel_real_7b_shapes(M, N, K):
    """o_proj at batch 1 (split 8), down_proj at 16 rows (split 9) and o_proj at 64 rows:
    the launcher's own tiles and splits on the real shapes."""
    assert w8a16._matmul_config(M, N, K, torch.float16)[3] > 1
    _check_linear(M, N, K, torch.float16)


def test_split_is_deterministic_and_same_across_splits():
    q, s = _quantized(64, 1030, seed=3)
    x = torch.randn(4, 1030, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    a = w8a16.w8a16_linear(x, q, s)
    assert torch.equal(a, w8a16.w8a16_linear(x, q, s))
    assert torch.allclose(a, w8a16.w8a16_linear(x, q, s, split=1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tl.dot: GPU check only")
def test_kernel_bf16():
    _check_linear(4, 4096, 4096, torch.bfloat16)


def test_bad_inputs_name_the_tensor():
    q, s = _quantized(8, 32)
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="qweight must be a 2-D int8"):
        w8a16.w8a16_linear(x, q.float(), s)
    with pytest.raises(ValueError, match="scales must be an fp32 tensor"):
        w8a16.w8a16_linear(x, q, s[:4])
    with pytest.raises(ValueError, match="x has 31 columns"):
        w8a16.w8a16_linear(x[:, :31], q, s)
    with pytest.raises(ValueError, match="w has shape"):
        w8a16.quantize_int8(torch.randn(8, 31, device=DEVICE), q, s)
    with pytest.raises(ValueError, match="split=99"):
        w8a16.w8a16_linear(x, q, s, split=99)


def test_compile_specs_match_launcher_choices():
    shape = next(s for s in SHAPES if s.name == "selfrag-7b")
    specs = w8a16.compile_specs(shape)
    have = {(sp.signature["x_ptr"], sp.signature["w_ptr"],
             tuple(sp.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")), sp.num_warps)
            for sp in specs if sp.name.startswith("w8a16_matmul")}
    for (dt, ptr), wptr in itertools.product(((torch.float16, "*fp16"), (torch.float32, "*fp32")), ("*i8", "*fp8e4nv")):
        for name, (N, K) in w8a16.weight_shapes(shape).items():
            for M in range(1, w8a16.MAX_KERNEL_ROWS + 1):       # every row count a launch can have
                bm, bn, bk, split, _, warps = w8a16._matmul_config(M, N, K, dt)
                assert (ptr, wptr, (bm, bn, bk, split > 1), warps) in have, (name, M, dt, wptr)
    assert {sp.name for sp in specs} >= {"w8a16_splitk_reduce", "w8a16_dequantize", "w8a16_dequantize[fp8]",
                                          "quantize_int8[fp16]", "quantize_int8[bf16]"}


# ---------------------------------------------------------------- fp8 (e4m3) weights
def test_reference_fp8_quantization_by_hand():
    w = torch.tensor([[4.48, -1.0, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]])
    q = torch.empty(2, 4, dtype=torch.float8_e4m3fn)
    s = torch.empty(2)
    R.quantize_fp8(w, q, s)
    # row 0: scale 4.48 / 448 = 0.01 -> 448, -100 (e4m3 spacing 8 above 64: 96 or 104 -> 96,
    # ties to even), 0, 1
    assert torch.allclose(s, torch.tensor([0.01, 0.0]))
    assert q.float().tolist() == [[448.0, -96.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("M,N,K", [(1, 37, 100), (5, 130, 520), (40, 64, 200), (300, 96, 130)])
def test_fp8_weights_through_the_same_kernels(M, N, K):
    """e4m3 weights converted in registers (the interpreter converts fp8 as the GPU does);
    M = 300 dequantizes them for the matmul."""
    for dtype in (torch.float16, torch.float32):
        _check_linear(M, N, K, dtype, fmt="fp8")


def test_fp8_real_7b_shape():
    _check_linear(1, 4096, 4096, torch.float16, fmt="fp8")


def test_fp8_kernels_are_built_only_for_sm89_and_newer():
    shape = next(s for s in SHAPES if s.name == "selfrag-7b")
    fp8 = [sp for sp in w8a16.compile_specs(shape) if "*fp8e4nv" in sp.signature.values()]
    assert fp8 and all(sp.min_arch == 89 for sp in fp8)
    assert all(sp.min_arch is None for sp in w8a16.compile_specs(shape) if sp not in fp8)


def test_quantize_int8_refuses_an_fp8_target():
    q = torch.empty(4, 8, dtype=torch.float8_e4m3fn, device=DEVICE)
    with pytest.raises(ValueError, match="quantize_fp8"):
        w8a16.quantize_int8(torch.randn(4, 8, device=DEVICE), q, torch.empty(4, device=DEVICE))
