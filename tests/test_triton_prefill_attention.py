"""Triton prefill attention vs the PyTorch reference, in the Triton interpreter (CPU), plus an
offline sm_90 compile of every configuration compile_specs reports."""
import dataclasses

import pytest
import torch

from kernels import reference as R
from kernels.metadata import AttentionMetadata
from kernels.triton.prefill_attention import _prefill_attention, prefill_attention
from tests.helpers import DEVICE

TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _case(contexts, q_lens, Hq, Hkv, D, bs, dtype, seed=0, fused_qkv=True, spare_blocks=5):
    """Random K/V scattered into shuffled pages of a cache; q packed over the sequences
    (as a strided view of a fused [T, Hq + 2 Hkv, D] buffer when fused_qkv)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    pages = [-(-c // bs) for c in contexts]
    nb = sum(pages) + spare_blocks
    kc = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype)   # garbage outside the contexts
    vc = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype)
    free = torch.randperm(nb, generator=g).tolist()
    tables = [[free.pop() for _ in range(n)] for n in pages]
    width = max(pages) + 1                                     # padded with 0 past each table
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    T = sum(q_lens)
    if fused_qkv:
        q = torch.randn(T, Hq + 2 * Hkv, D, generator=g).to(dtype)[:, :Hq]
    else:
        q = torch.randn(T, Hq, D, generator=g).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMetadata(True, torch.empty(0, dtype=torch.int64), bt,
                             torch.tensor(contexts, dtype=torch.int32), qsl, max(q_lens),
                             max(contexts))
    return q, kc, vc, meta


def _check(contexts, q_lens, Hq, Hkv, D, bs, dtype, use_maps=(False, True), **kw):
    """Kernel vs the reference (in fp32 on the same rounded inputs), with the dense grid and
    with the tile map."""
    q, kc, vc, meta = _case(contexts, q_lens, Hq, Hkv, D, bs, dtype, **kw)
    scale = D ** -0.5
    ref = R.prefill_attention(q.float(), kc.float(), vc.float(), meta, scale)
    for use_map in use_maps:
        out = _prefill_attention(q, kc, vc, meta, scale, use_map)
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out.float(), ref, **TOL[dtype], msg=lambda m: f"{use_map=}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_ragged_batch_gqa_4_2(dtype):
    # q_len 1, q_len == context, cached prefixes (forks / resumed prefill), contexts on and off
    # the page size, a sequence spanning several query tiles (T not a multiple of any tile)
    _check([1, 7, 16, 29, 83], [1, 3, 16, 29, 70], Hq=4, Hkv=2, D=16, bs=16, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gqa_8_1_small_pages_d32(dtype):
    # page size 4 (16 pages per 64-key tile), short and long sequences mixed
    _check([5, 100, 33], [5, 67, 1], Hq=8, Hkv=1, D=32, bs=4, dtype=dtype, fused_qkv=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_diagonal_at_key_tile_edges(dtype):
    # a query tile's first position just below, at and just above a key-tile edge (BLOCK_N is
    # 64 for fp16, 32 for fp32): the unmasked / masked loop split must be exact
    n = 64 if dtype == torch.float16 else 32
    prefixes = [n - 2, n - 1, n, n + 1, 2 * n - 1]
    q_lens = [3, 1, 2, 5, 1]
    _check([p + q for p, q in zip(prefixes, q_lens)], q_lens, Hq=2, Hkv=1, D=16, bs=8, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_verify_step_shapes(dtype):
    # a speculative verify step: every sequence runs its last token plus 0-4 drafts (query
    # lengths 1-5) over a long, ragged cached context (engine/spec_decode/speculator.py)
    _check([300, 17, 129, 64, 5, 200], [5, 1, 3, 5, 2, 1], Hq=4, Hkv=2, D=32, bs=16, dtype=dtype)


def test_mha_d64_long_prefix_fp16():
    # several unmasked key tiles before the diagonal (cached prefix of 90 + 2 query tiles)
    _check([211, 20], [121, 20], Hq=2, Hkv=2, D=64, bs=16, dtype=torch.float16)


def test_pages_larger_than_key_tile_fp32_d128():
    # fp32 key tiles are 32 keys: pages of 64 hold two tiles
    _check([70, 3], [45, 3], Hq=2, Hkv=1, D=128, bs=64, dtype=torch.float32)


def test_real_shape_gqa_32_8_d128_fp16():
    _check([40, 37], [40, 9], Hq=32, Hkv=8, D=128, bs=16, dtype=torch.float16, use_maps=(False,))


def test_single_sequence_and_empty_batch():
    _check([24], [24], Hq=2, Hkv=2, D=16, bs=16, dtype=torch.float32, fused_qkv=False)
    q, kc, vc, meta = _case([3], [3], 2, 2, 16, 16, torch.float32)
    out = prefill_attention(q[:0], kc, vc, dataclasses.replace(
        meta, query_start_loc=torch.zeros(2, dtype=torch.int32), max_query_len=0), 0.25)
    assert out.shape == (0, 2, 16)


def test_auto_grid_choice_and_cached_tile_map():
    # one 130-token prompt among 9 one-token ones: 10 * 3 dense tiles for 12 real ones -> map
    contexts, q_lens = [130] + [4] * 9, [130] + [1] * 9
    q, kc, vc, meta = _case(contexts, q_lens, 2, 1, 16, 16, torch.float16)
    out = prefill_attention(q, kc, vc, meta, 0.25)
    (key, tile_map), = meta.scratch.items()
    assert tile_map.tolist()[:3] == [[0, 2], [0, 1], [0, 0]] and tile_map.shape == (12, 2)
    out2 = prefill_attention(q, kc, vc, meta, 0.25)               # second layer: cached map
    assert meta.scratch[key] is tile_map and torch.equal(out, out2)
    ref = R.prefill_attention(q.float(), kc.float(), vc.float(), meta, 0.25)
    torch.testing.assert_close(out.float(), ref, **TOL[torch.float16])
    # similar lengths: dense grid, nothing cached
    q, kc, vc, meta = _case([30, 20], [30, 20], 2, 1, 16, 16, torch.float16)
    prefill_attention(q, kc, vc, meta, 0.25)
    assert not meta.scratch


def test_unaligned_q_view_is_copied():
    # a view whose row stride is not a multiple of 16 elements still gives the right answer
    q, kc, vc, meta = _case([9, 4], [9, 2], 2, 1, 16, 8, torch.float32, fused_qkv=False)
    buf = torch.randn(q.shape[0], 2 * 16 + 1)
    qv = buf[:, :32].unflatten(1, (2, 16))                    # row stride 33
    assert qv.stride(0) % 16
    out = prefill_attention(qv, kc, vc, meta, 0.25)
    ref = R.prefill_attention(qv.contiguous(), kc, vc, meta, 0.25)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_validation_errors():
    q, kc, vc, meta = _case([5], [5], 4, 2, 16, 16, torch.float32, fused_qkv=False)
    with pytest.raises(ValueError, match="head_dim"):
        bad = torch.zeros(5, 4, 48)
        prefill_attention(bad, torch.zeros(2, 16, 2, 48), torch.zeros(2, 16, 2, 48), meta, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        bad = torch.zeros(5, 4, 256)
        prefill_attention(bad, torch.zeros(2, 16, 2, 256), torch.zeros(2, 16, 2, 256), meta, 1.0)
    with pytest.raises(ValueError, match="k_cache dtype"):
        prefill_attention(q, kc.half(), vc, meta, 1.0)
    with pytest.raises(ValueError, match="multiple of k_cache heads"):
        prefill_attention(q[:, :3], kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        bad_meta = dataclasses.replace(meta, block_tables=meta.block_tables.long())
        prefill_attention(q, kc, vc, bad_meta, 1.0)
    with pytest.raises(ValueError, match="q's last dim"):
        prefill_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match="q dtype"):
        prefill_attention(q.double(), kc, vc, meta, 1.0)


# The offline sm_80/sm_90 compile of compile_specs (fp16 and bf16, no spills) is the
# report's gate: tests/test_kernel_report.py.


# bf16 dot kernels can't run in the interpreter (it multiplies bf16 bit patterns);
# they run compiled in the GPU check.
GPU_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tl.dot: GPU check only")


@GPU_ONLY
def test_bf16_ragged_batch_and_real_shape_on_gpu():
    _check([1, 7, 16, 29, 83], [1, 3, 16, 29, 70], Hq=4, Hkv=2, D=16, bs=16, dtype=torch.bfloat16)
    _check([40, 37, 700], [40, 5, 700], Hq=32, Hkv=8, D=128, bs=16, dtype=torch.bfloat16)
