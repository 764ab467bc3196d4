"""The decode GEMV (kernels/triton/gemv.py) vs its PyTorch reference (kernels.reference.gemv),
in Triton's interpreter on CPU (compiled on a GPU, where the GPU check runs this file).

Tolerances: both sum in fp32 and differ only in order, so fp32 outputs agree within 1e-5
relative and fp16 / bf16 ones within one ulp of the output dtype (2^-10, 2^-7 relative).
8-bit weights: int8 and e4m3 values are exact in fp32, the scale multiplies the fp32
sum once in both. Bits that the fixed order pins down are checked exactly: a row's output
is the same at every batch size (each row is reduced alone, in one order) and on every run.
"""
import pytest
import torch

from kernels import reference as R
from kernels.triton import gemv as G
from tests.helpers import DEVICE

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2 ** -10, atol=1e-4),
       torch.bfloat16: dict(rtol=2 ** -7, atol=1e-3)}


def _x(M, K, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(dtype).to(DEVICE)


def _weights(N, K, fmt, act, seed=0):
    """(w, scales) of format ``fmt``: 'float' (act's dtype), 'int8' or 'fp8' (the reference's
    own quantizers, so the 8-bit values are the engine's)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.05).to(act).to(DEVICE)
    if fmt == "float":
        return w, None
    q = torch.empty(N, K, dtype=torch.int8 if fmt == "int8" else torch.float8_e4m3fn, device=DEVICE)
    s = torch.empty(N, dtype=torch.float32, device=DEVICE)
    (R.quantize_int8 if fmt == "int8" else R.quantize_fp8)(w, q, s)
    return q, s


@pytest.mark.parametrize("act,fmt", [(torch.float16, "float"), (torch.bfloat16, "float"), (torch.float32, "float"),
                                     (torch.float16, "int8"), (torch.bfloat16, "int8"), (torch.float32, "int8"),
                                     (torch.float16, "fp8"), (torch.bfloat16, "fp8")])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (3, 7, 15), (16, 33, 600), (5, 130, 1030)])
def test_gemv_matches_the_reference_on_odd_shapes(act, fmt, M, N, K):
    """Ragged N (slabs of 1 row here: below 528 programs) and K (a partial last
    512-column step)."""
    w, s = _weights(N, K, fmt, act)
    x = _x(M, K, act)
    torch.testing.assert_close(G.gemv(x, w, s), R.gemv(x, w, s), **TOL[act])


@pytest.mark.parametrize("block_n", [8, 4, 2])
def test_gemv_with_wide_slabs_and_ragged_rows(block_n):
    """Slabs of 8, 4 and 2 rows over an N that none divides."""
    w, s = _weights(37, 700, "int8", torch.float16, seed=block_n)
    x = _x(3, 700, torch.float16)
    torch.testing.assert_close(G.gemv(x, w, s, block_n=block_n), R.gemv(x, w, s), **TOL[torch.float16])


@pytest.mark.parametrize("fmt", ["float", "int8"])
@pytest.mark.parametrize("name", ["qkv", "down"])
def test_gemv_on_the_7b_shapes(fmt, name):
    """The 7B's matrices as the launcher runs them: their K (4096; down's 11008: 22 K
    steps) and their slab width (qkv 8 rows of 12288, down 4 of 4096), batch 2, fp16, on
    the first 64 rows (the other rows are more programs of the same code: the interpreter
    would take minutes over all of them)."""
    from kernels.triton.common import SHAPES
    N, K = G.matrix_shapes(SHAPES[0])[name]
    block_n = G.gemv_config(N, K)[0]
    assert block_n == {"qkv": 8, "down": 4}[name]
    w, s = _weights(64, K, fmt, torch.float16)
    x = _x(2, K, torch.float16)
    torch.testing.assert_close(G.gemv(x, w, s, block_n=block_n), R.gemv(x, w, s), **TOL[torch.float16])


@pytest.mark.parametrize("fmt", ["float", "int8"])
def test_each_row_has_the_same_bits_at_every_batch_size_and_run(fmt):
    """Batch invariance: row i of a 16-row GEMV equals the GEMV of row i alone, bit for bit,
    and a second run gives the same bits."""
    N, K = 24, 1100
    w, s = _weights(N, K, fmt, torch.float16, seed=3)
    x = _x(16, K, torch.float16, seed=4)
    full = G.gemv(x, w, s)
    assert torch.equal(full, G.gemv(x, w, s))
    for i in (0, 7, 15):
        assert torch.equal(G.gemv(x[i:i + 1], w, s), full[i:i + 1])
    assert torch.equal(G.gemv(x[3:9], w, s), full[3:9])


def test_slab_width_reaches_the_program_target():
    """The slab is the widest of 8, 4, 2, 1 rows that still gives 528 programs."""
    assert [G.gemv_config(N, 4096)[0] for N in (32016, 22016, 12288, 4096, 2048, 1056, 1000, 7)] == \
        [8, 8, 8, 4, 2, 2, 1, 1]
    assert G.gemv_config(4096, 100)[1] == 128            # BLOCK_K never wider than K needs


def test_gemv_refuses_bad_input_by_name():
    x = _x(2, 8, torch.float16)
    w, s = _weights(4, 8, "int8", torch.float16)
    with pytest.raises(ValueError, match="at most 16 rows"):
        G.gemv(_x(17, 8, torch.float16), w, s)
    with pytest.raises(ValueError, match="scales"):
        G.gemv(x, w, None)
    with pytest.raises(ValueError, match="K = 8"):
        G.gemv(_x(2, 9, torch.float16), w, s)
    with pytest.raises(ValueError, match="x's dtype"):
        G.gemv(x, torch.zeros(4, 8, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError, match="block_n"):
        G.gemv(x, w, s, block_n=3)
    with pytest.raises(ValueError, match="scales are for 8-bit"):
        G.gemv(x, torch.zeros(4, 8, dtype=torch.float16, device=DEVICE), s)
    assert G.gemv(x[:0], w, s).shape == (0, 4)
    assert torch.equal(G.gemv(x[:, :0], torch.zeros(4, 0, dtype=torch.float16, device=DEVICE)),
                       torch.zeros(2, 4, dtype=torch.float16, device=DEVICE))


# No bf16 here: the interpreter converts fp32 to bf16 by truncation, not rounding (checked
# on this VM: 47% of random values differ from torch's round-to-nearest), and the fused
# activation is rounded to the model dtype before the sum, so a bf16 run here would be
# an ulp off per element. The bf16 path is the fp16 one with another dtype in `.to`.
@pytest.mark.parametrize("act,fmt", [(torch.float16, "float"), (torch.float16, "int8"), (torch.float32, "int8"),
                                     (torch.float16, "fp8")])
@pytest.mark.parametrize("M,N,K", [(1, 5, 9), (4, 37, 700)])
def test_silu_mul_gemv_matches_the_unfused_reference(act, fmt, M, N, K):
    """The down projection with silu(gate) * up as its prologue, against the reference:
    the activation in fp32 rounded once to the model dtype in both, then the same sum."""
    w, s = _weights(N, K, fmt, act, seed=K)
    gate_up = _x(M, 2 * K, act, seed=M)
    torch.testing.assert_close(G.silu_mul_gemv(gate_up, w, s), R.silu_mul_gemv(gate_up, w, s), **TOL[act])
    with pytest.raises(ValueError, match="expected 2K"):
        G.silu_mul_gemv(gate_up[:, 1:-1], w, s)
