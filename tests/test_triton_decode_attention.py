"""Triton split-KV paged decode attention vs the PyTorch reference (interpreter on CPU),
its CUDA-graph property (launch config independent of per-sequence lengths), the
launcher's validation, and an offline sm_80 / sm_90 compile of compile_specs (no spills)."""
import dataclasses

import pytest
import torch

from kernels import reference as R
from kernels.metadata import AttentionMetadata
from kernels.triton import decode_attention as M
from kernels.triton.common import SHAPES
from tests.helpers import DEVICE

TOL = {torch.float16: dict(atol=3e-3, rtol=1e-2), torch.float32: dict(atol=2e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GARBAGE = 50.0   # fills cache slots no sequence owns: any unmasked read shows up


def _setup(ctx, Hq, Hkv, D, bs, dtype, seed=0, extra_blocks=2):
    """Paged caches with shuffled block tables. Block 0 (the table padding) and every
    slot past a sequence's context hold GARBAGE, so a read the kernel should have
    masked changes the result."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    B = len(ctx)
    nblk = [max(1, -(-c // bs)) for c in ctx]
    max_blocks = max(nblk) + extra_blocks
    NB = 1 + sum(nblk) + 3
    kc = torch.full((NB, bs, Hkv, D), GARBAGE)
    vc = torch.full((NB, bs, Hkv, D), -GARBAGE)
    ids = (torch.randperm(NB - 1, generator=g) + 1).tolist()
    bt = torch.zeros(B, max_blocks, dtype=torch.int32)
    for i, c in enumerate(ctx):
        blocks = [ids.pop() for _ in range(nblk[i])]
        bt[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for p in range(c):
            kc[blocks[p // bs], p % bs] = torch.randn(Hkv, D, generator=g)
            vc[blocks[p // bs], p % bs] = torch.randn(Hkv, D, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    meta = AttentionMetadata(False, torch.zeros(B, dtype=torch.int64), bt,
                             torch.tensor(ctx, dtype=torch.int32),
                             torch.arange(B + 1, dtype=torch.int32), 1, max(ctx))
    return q.to(dtype), kc.to(dtype), vc.to(dtype), meta


def _reference(q, kc, vc, meta, scale):
    ref_meta = dataclasses.replace(meta, scratch={})
    return R.decode_attention(q, kc, vc, ref_meta, scale)


def _check(ctx, Hq, Hkv, D, bs, dtype, num_splits=None, seed=0):
    q, kc, vc, meta = _setup(ctx, Hq, Hkv, D, bs, dtype, seed)
    scale = D ** -0.5
    out = M.decode_attention(q, kc, vc, meta, scale, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(q, kc, vc, meta, scale), **TOL[dtype])
    return out


# (contexts, Hq, Hkv, D, block_size, num_splits)
CASES = [
    ([1], 4, 2, 16, 4, None),                    # context 1
    ([37], 4, 2, 32, 16, 1),                     # not a page multiple; direct (no-split) path
    ([37, 5, 70], 4, 1, 32, 8, 3),               # GQA 4/1, short + long, ragged splits
    ([70, 5], 4, 4, 64, 16, None),               # MHA 4/4, auto splits
    ([5, 1], 4, 2, 16, 4, 8),                    # far more splits than the sequences need
    ([130, 3, 64], 4, 2, 16, 16, 4),             # split boundary at a page, not a tile multiple
    ([200], 32, 8, 16, 16, 5),                   # GQA 32/8 with a small head_dim
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("ctx,Hq,Hkv,D,bs,ns", CASES)
@pytest.mark.parametrize("min_keys", [None, 1])
def test_matches_reference(ctx, Hq, Hkv, D, bs, ns, dtype, min_keys, monkeypatch):
    """min_keys 1: a live split needs only one SPLIT_ALIGN unit of keys, so these short
    contexts really are split and combined (at the default 256 they use one split)."""
    if min_keys is not None:
        monkeypatch.setattr(M, "MIN_KEYS_PER_SPLIT", min_keys)
    _check(ctx, Hq, Hkv, D, bs, dtype, num_splits=ns)


def _live(ctx, num_splits, bs, dtype, D=16, group=2):
    """The kernel's live split count per sequence, from the launcher's own MIN_SPLIT."""
    min_split = M._config(group, D, bs, dtype, 1)["MIN_SPLIT"]
    return [min(num_splits, -(-c // min_split)) for c in ctx]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_many_splits_mixed_contexts(dtype):
    """A CUDA-graph-like num_splits of 32 over long, short and empty contexts in one batch:
    each sequence uses only the splits its own length needs (3, 1, 0, 2, 1 and 1 here)."""
    ctx = [600, 3, 0, 257, 64, 1]
    assert _live(ctx, 32, 8, dtype) == [3, 1, 0, 2, 1, 1]
    q, kc, vc, meta = _setup(ctx, 4, 2, 16, 8, dtype, seed=13)
    out = M.decode_attention(q, kc, vc, meta, 0.25, num_splits=32)
    keep = [i for i, c in enumerate(ctx) if c > 0]
    live = dataclasses.replace(meta, block_tables=meta.block_tables[keep],
                               context_lens=meta.context_lens[keep], scratch={})
    torch.testing.assert_close(out[keep], R.decode_attention(q[keep], kc, vc, live, 0.25),
                               **TOL[dtype])
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_short_sequences_skip_dead_splits():
    """Observable proof that work follows the live context: the scratch is poisoned with
    NaN before the call; afterwards exactly the live rows of each sequence were written
    (the dead splits returned without storing), and the output is still right (the reduce
    never read a dead row, or NaN would have leaked into it)."""
    ctx, ns, dtype = [600, 3, 0, 257, 40], 8, torch.float32
    q, kc, vc, meta = _setup(ctx, 4, 2, 16, 8, dtype, seed=17)
    M.decode_attention(q, kc, vc, meta, 0.25, num_splits=ns)       # allocates the scratch
    (key,) = [k for k in meta.scratch if k[0] == "triton_decode_attention_scratch"]
    part, lse = meta.scratch[key]
    part.fill_(float("nan"))
    lse.fill_(float("nan"))
    out = M.decode_attention(q, kc, vc, meta, 0.25, num_splits=ns)
    keep = [i for i, c in enumerate(ctx) if c > 0]
    live_meta = dataclasses.replace(meta, block_tables=meta.block_tables[keep],
                                    context_lens=meta.context_lens[keep], scratch={})
    torch.testing.assert_close(out[keep], R.decode_attention(q[keep], kc, vc, live_meta, 0.25),
                               **TOL[dtype])
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    written = ~lse.isnan()                                          # [B, Hq, ns]
    for i, n in enumerate(_live(ctx, ns, 8, dtype)):
        assert written[i, :, :n].all() and not written[i, :, n:].any(), (i, ctx[i], n)
        assert not part[i, :, :n].isnan().any() and part[i, :, n:].isnan().all()


@pytest.mark.parametrize("Hkv,ns", [(8, None), (32, 3)])
def test_real_shape_head_dim_128(Hkv, ns):
    """32 query heads, head_dim 128, block size 16: GQA 32/8 and MHA 32/32, contexts ~50."""
    _check([50, 47], 32, Hkv, 128, 16, torch.float16, num_splits=ns)


def test_real_shape_fp32_single_sequence():
    _check([49], 32, 8, 128, 16, torch.float32, num_splits=2)


def test_split_counts_agree():
    """1 split, a few, and many more than needed give the same answer (fp32)."""
    outs = [_check([45, 9, 1], 4, 2, 32, 4, torch.float32, num_splits=n) for n in (1, 2, 7, 32)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def test_strided_q_from_fused_qkv():
    """q as a view of the fused qkv matmul output [B, (Hq + 2 Hkv) * D]."""
    Hq, Hkv, D, bs = 4, 2, 32, 8
    q, kc, vc, meta = _setup([23, 9], Hq, Hkv, D, bs, torch.float16, seed=3)
    qkv = torch.randn(2, (Hq + 2 * Hkv) * D).half()
    qv = qkv[:, :Hq * D].view(2, Hq, D)
    qv.copy_(q)
    assert not qv.is_contiguous()
    out = M.decode_attention(qv, kc, vc, meta, 0.2, num_splits=2)
    torch.testing.assert_close(out, _reference(q, kc, vc, meta, 0.2), **TOL[torch.float16])


class _RecordingKernel:
    """Wraps a @triton.jit kernel; records each launch's grid and non-tensor args."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            scalars = [a for a in args if not isinstance(a, torch.Tensor)]
            tensors = [(a.data_ptr(), a.shape, a.stride()) for a in args
                       if isinstance(a, torch.Tensor)]
            self.launches.append((tuple(grid), scalars, tensors, dict(kwargs)))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_launch_independent_of_context_lens(monkeypatch):
    """CUDA-graph property: with num_splits given, the grid, scalar args, constexprs and
    buffers of both launches are identical whatever the per-sequence lengths (only the
    device tensors' contents change, as in a graph replay), and results stay correct."""
    split_k = _RecordingKernel(M._decode_split_kernel)
    reduce_k = _RecordingKernel(M._decode_reduce_kernel)
    monkeypatch.setattr(M, "_decode_split_kernel", split_k)
    monkeypatch.setattr(M, "_decode_reduce_kernel", reduce_k)
    Hq, Hkv, D, bs, dtype = 4, 2, 16, 4, torch.float32
    q, kc, vc, meta = _setup([61, 62, 63], Hq, Hkv, D, bs, dtype, seed=5)   # the "capture"
    capture_max = meta.max_context_len
    outs = []
    for lens in ([61, 62, 63], [1, 40, 0], [17, 63, 5]):
        meta.context_lens.copy_(torch.tensor(lens, dtype=torch.int32))    # in place, as a replay
        meta.scratch.clear()
        out = M.decode_attention(q, kc, vc, meta, 0.25, num_splits=6)
        outs.append(out)
        keep = [i for i, c in enumerate(lens) if c > 0]
        live = dataclasses.replace(meta, block_tables=meta.block_tables[keep],
                                   context_lens=meta.context_lens[keep].clone(),
                                   max_context_len=max(lens), scratch={})
        torch.testing.assert_close(out[keep], R.decode_attention(q[keep], kc, vc, live, 0.25),
                                   **TOL[dtype])
        for i, c in enumerate(lens):
            if c == 0:          # empty sequence (a padding slot of a graph batch): zeros, no NaN
                assert torch.equal(out[i], torch.zeros_like(out[i]))
    assert meta.max_context_len == capture_max
    for rec in (split_k, reduce_k):
        assert len(rec.launches) == 3
        grid, scalars, _, kwargs = rec.launches[0]
        for g, s, _, kw in rec.launches[1:]:
            assert (g, s, kw) == (grid, scalars, kwargs)
    assert split_k.launches[0][0] == (3, Hkv, 6) and reduce_k.launches[0][0] == (3, Hq)


@pytest.mark.parametrize("ns", [1, 3])
def test_empty_sequence_gives_zeros(ns):
    """context_len 0 (a padding slot of a graph batch): zeros, no NaN, others unaffected."""
    q, kc, vc, meta = _setup([0, 11], 4, 2, 16, 4, torch.float16, seed=11)
    out = M.decode_attention(q, kc, vc, meta, 0.25, num_splits=ns)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    live = dataclasses.replace(meta, block_tables=meta.block_tables[1:],
                               context_lens=meta.context_lens[1:], scratch={})
    torch.testing.assert_close(out[1:], R.decode_attention(q[1:], kc, vc, live, 0.25),
                               **TOL[torch.float16])


def test_scratch_shared_across_layers():
    """Layers of a step reuse one scratch pair from meta.scratch."""
    q, kc, vc, meta = _setup([30, 12], 4, 2, 16, 4, torch.float32, seed=7)
    a = M.decode_attention(q, kc, vc, meta, 0.3, num_splits=3)
    keys = [k for k in meta.scratch if k[0] == "triton_decode_attention_scratch"]
    assert len(keys) == 1
    bufs = meta.scratch[keys[0]]
    assert bufs[0].shape == (2, 4, 3, 16) and bufs[1].shape == (2, 4, 3)
    b = M.decode_attention(q, kc, vc, meta, 0.3, num_splits=3)
    assert meta.scratch[keys[0]] is bufs and torch.equal(a, b)


def test_pick_num_splits():
    pick = M.pick_num_splits
    assert pick(1, 8, 1, 16, 132) == 1                       # tiny context: no split
    assert pick(1, 8, 4096, 16, 132) == 16                   # 1 x 8 programs: 256 keys a split
    assert pick(1, 8, 32768, 16, 132) == M.MAX_SPLITS        # ... capped
    assert pick(1, 32, 4096, 16, 132) == 9                   # ceil(2 * 132 / 32)
    assert pick(64, 32, 4096, 16, 132) == 1                  # big batch fills the GPU already
    assert pick(1, 32, 300, 16, 132) == 2                    # >= 256 keys per split
    for B in (1, 3, 17, 256):
        for L in (1, 15, 16, 17, 999, 32768):
            assert 1 <= pick(B, 8, L, 16, 132) <= M.MAX_SPLITS
    assert M.sm_count(torch.device("cpu")) == 132


def test_kv_align_hint_only_when_true():
    kc = torch.zeros(4, 16, 2, 32, dtype=torch.float16)
    assert M._kv_align(kc, kc) == 8
    odd = torch.zeros(4 * 16 * 2 * 33 + 1, dtype=torch.float16)[1:].view(4, 16, 2, 33)[..., :32]
    assert M._kv_align(odd, odd) == 1
    # misaligned caches still compute correctly (the hint is simply not given)
    q, kc2, vc2, meta = _setup([21], 4, 2, 32, 16, torch.float16, seed=9)
    kodd = torch.zeros(kc2.numel() + 1, dtype=torch.float16)[1:].view(kc2.shape)
    kodd.copy_(kc2)
    out = M.decode_attention(q, kodd, vc2, meta, 0.2, num_splits=2)
    torch.testing.assert_close(out, _reference(q, kc2, vc2, meta, 0.2), **TOL[torch.float16])


def test_validation():
    q, kc, vc, meta = _setup([9, 4], 4, 2, 16, 4, torch.float16)
    call = M.decode_attention
    with pytest.raises(ValueError, match="q must be"):
        call(q[0], kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match="v_cache dtype"):
        call(q, kc, vc.float(), meta, 1.0)
    with pytest.raises(ValueError, match="multiple of k_cache kv heads"):
        call(q[:, :3], kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match="q must have stride"):
        call(q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match="k_cache head_dim"):
        call(q, kc[..., :8], vc[..., :8], meta, 1.0)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        call(q, kc, vc, dataclasses.replace(meta, block_tables=meta.block_tables.long()), 1.0)
    with pytest.raises(ValueError, match="q has 2 rows; meta describes 1 sequences"):
        call(q, kc, vc, dataclasses.replace(meta, context_lens=meta.context_lens[:1]), 1.0)
    with pytest.raises(ValueError, match="context_lens must be int32"):
        call(q, kc, vc, dataclasses.replace(meta, context_lens=meta.context_lens.long()), 1.0)
    with pytest.raises(ValueError, match="max_context_len"):
        call(q, kc, vc, dataclasses.replace(meta, max_context_len=10_000), 1.0)
    for bad in (0, M.MAX_SPLITS + 1, 2.0):
        with pytest.raises(ValueError, match="num_splits"):
            call(q, kc, vc, meta, 1.0, num_splits=bad)
    empty = M.decode_attention(q[:0], kc, vc, dataclasses.replace(
        meta, block_tables=meta.block_tables[:0], context_lens=meta.context_lens[:0]), 1.0)
    assert empty.shape == (0, 4, 16)


# ---------------------------------------------------------------- offline compile ------

# The offline sm_80/sm_90 compile of compile_specs (fp16 and bf16, no spills) is the
# report's gate: tests/test_kernel_report.py.


def test_compile_specs_match_launcher_choices():
    shape = next(s for s in SHAPES if s.name == "gqa-32-8")
    specs = M.compile_specs(shape)
    assert [s.name for s in specs] == [
        "decode_attention[split]", "decode_attention[direct]", "decode_attention[reduce]",
        "decode_attention[split,q5]", "decode_attention[direct,q5]", "decode_attention[reduce,q5]"]
    for (split, direct, red), Q, rows_pad in ((specs[:3], 1, 16), (specs[3:], 5, 32)):  # 4 heads x Q rows
        cfg = M._config(4, 128, 16, torch.float16, 8, Q)
        assert cfg["ROWS_PAD"] == rows_pad and cfg["QUERY_LEN"] == Q
        assert split.num_warps == cfg["num_warps"] and split.num_stages == cfg["num_stages"]
        assert {k: v for k, v in split.constexprs.items() if k != "DIRECT_OUT"} == {
            k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        assert not split.constexprs["DIRECT_OUT"] and direct.constexprs["DIRECT_OUT"]
        assert split.signature["q_ptr"] == "*fp16" and split.signature["part_ptr"] == "*fp32"
        assert direct.signature["part_ptr"] == "*fp16"        # the launcher passes out there
        assert red.constexprs == {"QUERY_LEN": Q, "HEAD_DIM": 128, "BLOCK_D": 128,
                                  "SPLITS_PAD": M.MAX_SPLITS, "MIN_SPLIT": split.constexprs["MIN_SPLIT"]}
        assert split.constexprs["MIN_SPLIT"] == 256           # 256 keys, whole 64-key tiles
        # every kernel argument is typed
        for spec in (split, direct, red):
            assert list(spec.signature) == list(spec.kernel.arg_names)


# ---- verify steps: Q query rows per sequence, each with its causal limit ----------------

def _verify_setup(ctx, qlens, Q, Hq, Hkv, D, bs, dtype, seed=0):
    """A verify step's inputs: sequence i has context ctx[i] (its drafts included) and
    qlens[i] real query rows of Q; its padding rows hold random queries too."""
    q1, kc, vc, meta = _setup(ctx, Hq, Hkv, D, bs, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(ctx) * Q, Hq, D, generator=g).to(dtype)
    meta = dataclasses.replace(meta, max_query_len=Q, query_lens=torch.tensor(qlens, dtype=torch.int32))
    return q, kc, vc, meta


def _causal_by_hand(q, kc, vc, meta, scale, ctx, qlens, Q):
    """Each real row as a one-query decode over its own prefix (the plain decode
    reference, independent of the multi-row mask); padding rows zero."""
    out = torch.zeros_like(q, dtype=torch.float32)
    for i, (c, n) in enumerate(zip(ctx, qlens)):
        for j in range(n):
            lim = c - n + 1 + j
            m = AttentionMetadata(False, torch.zeros(1, dtype=torch.int64), meta.block_tables[i:i + 1],
                                  torch.tensor([lim], dtype=torch.int32), torch.arange(2, dtype=torch.int32),
                                  1, lim)
            out[i * Q + j] = R.decode_attention(q[i * Q + j:i * Q + j + 1].float(), kc.float(), vc.float(),
                                                m, scale)[0]
    return out


# (contexts with the drafts, real rows per sequence, Q, Hq, Hkv, D, block_size, num_splits)
VERIFY_CASES = [
    ([9, 40, 5], [5, 1, 3], 5, 4, 4, 32, 8, None),      # MHA: 5 rows of a 16-row tile
    ([70, 33], [5, 2], 5, 8, 2, 16, 16, 3),             # GQA 4 x 5 = 20 rows -> 32; split
    ([130, 17, 64], [3, 3, 1], 3, 4, 2, 16, 16, 4),     # split boundary at a page
    ([6], [6], 6, 4, 4, 16, 4, 1),                      # every key is a draft but the first
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("ctx,qlens,Q,Hq,Hkv,D,bs,ns", VERIFY_CASES)
def test_verify_rows_match_the_reference_and_plain_decode(ctx, qlens, Q, Hq, Hkv, D, bs, ns, dtype, monkeypatch):
    monkeypatch.setattr(M, "MIN_KEYS_PER_SPLIT", 1)     # several splits even at these lengths
    q, kc, vc, meta = _verify_setup(ctx, qlens, Q, Hq, Hkv, D, bs, dtype)
    scale = D ** -0.5
    out = M.decode_attention(q, kc, vc, meta, scale, num_splits=ns)
    assert out.shape == q.shape and torch.isfinite(out).all()
    ref = _reference(q, kc, vc, meta, scale)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    by_hand = _causal_by_hand(q, kc, vc, meta, scale, ctx, qlens, Q)
    torch.testing.assert_close(ref.float(), by_hand, **TOL[dtype])
    for i, n in enumerate(qlens):                          # padding rows are exactly zero
        assert not out[i * Q + n:(i + 1) * Q].any() and not ref[i * Q + n:(i + 1) * Q].any()


def test_verify_rows_at_the_7b_shape():
    ctx, qlens, Q = [300, 45], [5, 2], 5
    q, kc, vc, meta = _verify_setup(ctx, qlens, Q, 32, 32, 128, 16, torch.float16)
    out = M.decode_attention(q, kc, vc, meta, 128 ** -0.5, num_splits=2)
    torch.testing.assert_close(out, _reference(q, kc, vc, meta, 128 ** -0.5), **TOL[torch.float16])


def test_verify_validation():
    q, kc, vc, meta = _verify_setup([9, 40], [5, 1], 5, 4, 4, 32, 8, torch.float32)
    with pytest.raises(ValueError, match="q has 9 rows; meta describes 2 sequences x 5 query rows"):
        M.decode_attention(q[:9], kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match="meta.query_lens must be contiguous int32"):
        M.decode_attention(q, kc, vc, dataclasses.replace(meta, query_lens=meta.query_lens.long()), 1.0)


# bf16 dot kernels can't run in the interpreter (it multiplies bf16 bit patterns);
# they run compiled in the GPU check, here at the real 7B shape too.
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tl.dot: GPU check only")
@pytest.mark.parametrize("ctx,Hq,Hkv,D,bs,ns", CASES + [([2048, 513, 77], 32, 32, 128, 16, None),
                                                       ([4000, 1], 32, 8, 128, 16, 16)])
def test_bf16_on_gpu(ctx, Hq, Hkv, D, bs, ns):
    _check(ctx, Hq, Hkv, D, bs, torch.bfloat16, num_splits=ns)
