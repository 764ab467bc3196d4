"""Split-KV (flash-decoding) paged attention for decode: one query per sequence, or
Q = 1 + k query rows per sequence in a speculative verify step.

Semantics are exactly ``kernels.reference.decode_attention``:

  q        [B, Hq, D]    fp16/bf16/fp32; any strides with stride(2) == 1 (may be a
                         view into the fused qkv matmul output: stride(0) = (Hq+2Hkv)*D)
  k_cache  [NB, bs, Hkv, D]  same dtype; any strides with stride(3) == 1
  v_cache  [NB, bs, Hkv, D]  same dtype; its own strides, stride(3) == 1
  meta.block_tables [B, max_blocks] int32, stride(1) == 1 (padded with 0, never read
                         past the sequence's context: loads are masked)
  meta.context_lens [B] int32: sequence i attends to positions 0..context_lens[i]-1;
                         position p lives in block block_tables[i, p // bs], offset p % bs
  out      [B, Hq, D]    contiguous, q's dtype (strides Hq*D, D, 1)

A verify step (``meta.query_lens`` set, Q = meta.max_query_len) has q and out
[B * Q, Hq, D]: row j of sequence i sits at position ctx_i - qlen_i + j and sees the
keys up to itself; rows j >= qlen_i are padding and come out zero. The layout is
fixed (Q rows per sequence whatever its drafts), so one CUDA graph per (batch, Q)
serves every step. The program's query tile holds its GQA group's G heads x Q rows,
ROWS_PAD = max(16, next_pow2(G * Q)) rows: for MHA (G = 1) and Q <= 16 that is the
same 16-row tile plain decode already pads to, so a verify step reads each K/V tile
once for all its rows and costs about a decode step's attention.

Two kernels:

1. ``_decode_split_kernel``, grid (B, Hkv, num_splits). One program handles the
   G = Hq // Hkv query heads that share KV head ``h`` (its GQA group), times its Q
   query rows, over one split of one sequence's context, so each K/V tile is read
   from HBM once per KV head, not once per query head or row. The queries are a
   [ROWS_PAD, D] tile (ROWS_PAD = max(16, next_pow2(G * Q)): ``tl.dot`` needs >= 16
   rows; padded rows load 0 and are never stored) and scores / P@V are ``tl.dot``s with an
   fp32 online softmax (exp2 domain). Each split writes, per query head, its
   normalised fp32 partial output and its log2-sum-exp into fp32 scratch:
       partial [B * Q, Hq, num_splits, D] fp32 (contiguous)
       lse     [B * Q, Hq, num_splits]    fp32 (contiguous), log2 domain, -inf = empty
   With num_splits == 1 (constexpr DIRECT_OUT) it writes ``out`` directly and no
   scratch / second kernel is used.

2. ``_decode_reduce_kernel``, grid (B * Q, Hq): combines the live splits of one
   (sequence, query head): out = sum_s 2^(lse_s - M) * partial_s / sum_s 2^(lse_s - M).

The work follows each sequence's LIVE context, computed ON THE DEVICE from its own
context_len (the grid's num_splits is only an upper bound, which a CUDA graph fixes
from max_model_len): sequence i uses
    live_i = min(num_splits, ceil(ctx_i / MIN_SPLIT))        (0 for ctx_i = 0)
splits, MIN_SPLIT = MIN_KEYS_PER_SPLIT rounded up to whole SPLIT_ALIGN = lcm(block_size,
BLOCK_N) units, and keys_per_split_i = round_up(ceil(ctx_i / live_i), SPLIT_ALIGN), so a
split covers whole KV pages and whole BLOCK_N tiles; split s covers [s * keys_per_split_i,
min((s+1) * keys_per_split_i, ctx_i)). Split programs with s >= live_i read no K/V and
store nothing (masked stores); the reduce computes the same live_i and reads only those
rows. So a 300-token context in a graph captured with 32 splits gets 2 working split
programs (192 + 108 keys) per KV head, not 5 of <= 64 keys plus 27 that wrote empty
partials, and the reduce reads 2 partials, not 32. With num_splits == 1 (DIRECT_OUT)
nothing changes. (A live split that rounding leaves without keys stores lse = -inf and a
zero partial: it contributes nothing and produces no NaN.) A sequence with context_len 0
(e.g. a padding slot of a CUDA-graph batch) has no live split and gets an all-zero output
row (the reference would give NaN there).

CUDA graphs: the grid depends only on (B, Hkv, num_splits), never on the
per-sequence lengths, and the launcher does no host<->device sync (it never
reads context_lens / block_tables on the host). The model runner therefore
passes ``num_splits`` explicitly when capturing (e.g. ``pick_num_splits`` of the
capture's batch size and largest context), and one captured launch serves any
context_lens <= that capture's max context (bounded by block_tables' width).
Scratch size is bounded by MAX_SPLITS.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.metadata import AttentionMetadata
from kernels.triton.common import CompileSpec, ModelShape

# Upper bound on splits: bounds the scratch (B*Hq*MAX_SPLITS*D fp32) and is the
# reduce kernel's fixed tile height, so one reduce config serves every num_splits.
MAX_SPLITS = 32
# A split should stream at least this many keys: below it, the fixed cost of a
# program (load q, write partial + lse, reduce pass) outweighs the parallelism.
# 256 keys x D=128 fp16 = 64 KiB of K plus 64 KiB of V per program. Used twice: by
# pick_num_splits on the host (the grid), and in-kernel per sequence (its live splits).
MIN_KEYS_PER_SPLIT = 256
# Target concurrency: programs per SM. Decode attention is bandwidth bound; two
# resident programs per SM let one issue loads while the other does its softmax.
PROGRAMS_PER_SM = 2
CPU_SM_COUNT = 132          # H100 SXM; used when the tensors are not on CUDA
LOG2E = 1.4426950408889634

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@triton.jit
def _live_splits(ctx, num_splits, MIN_SPLIT: tl.constexpr):
    """Splits a sequence of ``ctx`` keys really uses: at most num_splits, each of at least
    MIN_SPLIT keys (0 for ctx 0). The split and reduce kernels must agree on it."""
    return tl.minimum(num_splits, tl.cdiv(ctx, MIN_SPLIT))


# Not specialized (see kernels/triton/common.py): num_splits (picked per step from the
# step's longest context, or per CUDA-graph bucket) and stride_btb (the block-table width:
# the widest sequence's block count when built per step). Neither feeds a vectorized
# address: num_splits sizes scalar split bounds, stride_btb offsets scalar page-id loads.
@triton.jit(do_not_specialize=["num_splits", "stride_btb"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, qlen_ptr, out_ptr, part_ptr, lse_ptr,
    scale_log2,                                   # softmax scale * log2(e), fp32
    num_splits,                                   # == grid dim 2
    stride_qb, stride_qh,                         # q [B * Q, Hq, D], stride(2) == 1
    stride_kb, stride_ks, stride_kh,              # k_cache [NB, bs, Hkv, D], stride(3) == 1
    stride_vb, stride_vs, stride_vh,              # v_cache, same layout, own strides
    stride_btb,                                   # block_tables [B, max_blocks], stride(1) == 1
    GROUP: tl.constexpr,                          # query heads per KV head
    QUERY_LEN: tl.constexpr,                      # Q: query rows per sequence (1: decode)
    ROWS_PAD: tl.constexpr,                       # >= 16, power of two, >= GROUP * QUERY_LEN
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,                        # next_pow2(HEAD_DIM), >= 16
    BLOCK_N: tl.constexpr,                        # keys per tile
    PAGE_SIZE: tl.constexpr,                      # KV block size (positions per page)
    SPLIT_ALIGN: tl.constexpr,                    # lcm(PAGE_SIZE, BLOCK_N)
    MIN_SPLIT: tl.constexpr,                      # fewest keys of a live split (whole SPLIT_ALIGNs)
    DIRECT_OUT: tl.constexpr,                     # num_splits == 1: write out, no scratch
    KV_ALIGN: tl.constexpr,                       # elements per 16 B if the caches' base and
                                                  # strides are 16 B aligned, else 1 (no hint)
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP
    ROWS: tl.constexpr = GROUP * QUERY_LEN

    offs_r = tl.arange(0, ROWS_PAD)                                    # tile row: head g, query j
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_r = offs_r < ROWS
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_r // QUERY_LEN                          # [ROWS_PAD]
    qrows = seq.to(tl.int64) * QUERY_LEN + offs_r % QUERY_LEN          # rows of q / out

    # this sequence's slice of the context, in whole pages / whole tiles, over the `live`
    # splits its own length needs. A split past them starts at or after ctx (split *
    # keys_per_split >= live * ceil(ctx / live)): no loop iteration, and its stores are
    # masked off below, so it reads no K/V and writes nothing (the reduce computes the same
    # `live` and reads only those). Masking, not an early `return`: a return made Triton
    # 3.9 put the whole body under a branch and took 64 -> 77 registers at D=128 (sm_80).
    ctx = tl.load(ctx_ptr + seq)
    if QUERY_LEN > 1:
        # row j sees keys < ctx - qlen + 1 + j; padding rows (j >= qlen) none
        qlen = tl.load(qlen_ptr + seq)
        j = offs_r % QUERY_LEN
        limit = tl.where(j < qlen, ctx - qlen + 1 + j, 0)              # [ROWS_PAD]
    live = _live_splits(ctx, num_splits, MIN_SPLIT)
    keys_per_split = tl.cdiv(tl.cdiv(ctx, tl.maximum(live, 1)), SPLIT_ALIGN) * SPLIT_ALIGN
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, ctx)
    # heads this program stores: its group, or none past the live splits (a head limit, not
    # a scalar & tensor mask, which the interpreter mistypes); DIRECT_OUT stores always
    # (num_splits 1: the one split, also the zero row of ctx 0)
    n_store = ROWS if DIRECT_OUT else tl.where(split < live, ROWS, 0)

    q_offs = (qrows[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :])
    q = tl.load(q_ptr + q_offs, mask=mask_r[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([ROWS_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS_PAD], tl.float32)
    acc = tl.zeros([ROWS_PAD, BLOCK_D], tl.float32)

    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    if KV_ALIGN > 1:
        # the JIT learns this from its own 16-divisibility specialization; stating it
        # (launcher-checked) keeps 16 B vector loads also where no specialization is
        # made, e.g. the offline report's compile of compile_specs
        k_head = tl.multiple_of(k_head, 16)
        v_head = tl.multiple_of(v_head, 16)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n                                               # [BLOCK_N]
        mask_n = pos < end
        page = tl.load(bt_row + pos // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        k_rows = tl.multiple_of(page * stride_kb + slot * stride_ks, [KV_ALIGN])
        v_rows = tl.multiple_of(page * stride_vb + slot * stride_vs, [KV_ALIGN])
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)                           # [BLOCK_N, BLOCK_D]
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [ROWS_PAD, BLOCK_N]
        if QUERY_LEN > 1:
            s = tl.where(pos[None, :] < limit[:, None], s, float("-inf"))
            # a row's causal limit may leave it no key in this tile: a -inf max is taken
            # as 0, so its alpha and p are 0, not NaN
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            s = tl.where(mask_n[None, :], s, float("-inf"))
            # every tile has >= 1 valid key (n0 < end), so m_new is finite
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]                     # empty split -> 0
    store_r = offs_r < n_store
    out_mask = store_r[:, None] & mask_d[None, :]
    if DIRECT_OUT:
        o_offs = (qrows[:, None] * num_q_heads + heads[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (qrows * num_q_heads + heads) * num_splits + split              # [ROWS_PAD]
        tl.store(part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=out_mask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=store_r)


@triton.jit(do_not_specialize=["num_splits"])     # as in the split kernel
def _decode_reduce_kernel(
    part_ptr, lse_ptr, out_ptr,                   # partial [B*Q,Hq,S,D] fp32, lse [B*Q,Hq,S] fp32, out [B*Q,Hq,D]
    ctx_ptr,                                      # context_lens [B] int32: how many splits are live
    num_splits,
    QUERY_LEN: tl.constexpr,                      # Q: query rows per sequence
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,                     # MAX_SPLITS: fixed, masked to the live splits
    MIN_SPLIT: tl.constexpr,                      # the split kernel's
):
    qrow = tl.program_id(0)
    seq = qrow // QUERY_LEN
    head = tl.program_id(1)
    row = qrow.to(tl.int64) * tl.num_programs(1) + head                 # (query row, head) index
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    # only the splits the split kernel wrote: the rest of the scratch is stale
    mask_s = offs_s < _live_splits(tl.load(ctx_ptr + seq), num_splits, MIN_SPLIT)
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(lse_ptr + row * num_splits + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)      # no live / all empty (ctx 0): weights all 0
    w = tl.exp2(lse - m)                          # empty / masked splits -> 0
    denom = tl.sum(w, 0)
    part = tl.load(part_ptr + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                   mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    o = tl.sum(part * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------- configs

def _config(group: int, head_dim: int, block_size: int, dtype: torch.dtype, kv_align: int,
            query_len: int = 1) -> dict:
    """Block sizes / warps for the split kernel (static: no GPU to autotune on here).

    - ROWS_PAD: the GQA group times the query rows (1, or 1 + k drafts when verifying)
      padded to >= 16 rows, the smallest tl.dot M. For
      MHA (group 1) that is 15 wasted rows of tensor-core work per tile; we keep
      the one dot path anyway: decode is bandwidth bound (a 64-key tile is 32 KiB
      of K+V at D=128 fp16 against ~0.5 MFLOP of padded mma), and one code path
      means one set of tested numerics for MHA and GQA.
    - BLOCK_N = 64 keys per tile (4 pages of 16): K and V tiles of 64 x 128 fp16 =
      16 KiB each, enough bytes in flight per program; compiled, the kernel takes
      38 KiB of shared memory (sm_80 / sm_90), room for several programs per SM.
      fp32 caches halve it to 32 (same bytes per tile) and use 8 warps, below.
    - num_warps 4 (8 for D >= 128, below) / num_stages 2: a [16, 64] score tile and a
      [16, D] fp32 accumulator are a few registers per thread; two stages let the
      next tile's gather loads (cp.async) overlap this tile's math. Checked
      spill-free offline for sm_80 / sm_90 (tests/test_triton_decode_attention.py).
    - KV_ALIGN (see _kv_align): 16 B vector loads of K/V rows. Without it (no
      alignment known) the gathers become scalar loads with one 64-bit address
      per element and the D=128 kernel spills at 255 registers.
    """
    group_pad = max(16, triton.next_power_of_2(group * query_len))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, num_warps = 64, 4
    if block_d >= 128:
        # D=128 at 4 warps: 96 regs/thread, and Triton 3.9's ptxas flags
        # (--regAllocOptLevel=2) then spill 4 B on sm_90; 8 warps: 64-66 regs, no spill,
        # and still 3+ programs per SM by registers and shared memory
        num_warps = 8
    if dtype == torch.float32:
        # fp32 K/V tiles are twice the bytes and the "ieee" dot runs on FMAs: half the
        # keys per tile and 8 warps (D=128: 4 warps spilled on sm_90, 8 use 48 regs)
        block_n, num_warps = 32, 8
    if group_pad >= 64:
        # big groups (MQA-like, not in SHAPES): a [64, 128] fp32 accumulator is 64 regs
        # per thread at 4 warps (sm_80 spilled); 8 warps and 32-key tiles halve it
        block_n, num_warps = 32, 8
    split_align = math.lcm(block_size, block_n)
    # read at call time (not import time), so a test can shrink it to split short contexts
    min_split = triton.cdiv(MIN_KEYS_PER_SPLIT, split_align) * split_align
    return dict(GROUP=group, QUERY_LEN=query_len, ROWS_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_D=block_d,
                BLOCK_N=block_n, PAGE_SIZE=block_size, SPLIT_ALIGN=split_align,
                MIN_SPLIT=min_split, KV_ALIGN=kv_align, num_warps=num_warps, num_stages=2)


def _kv_align(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """Elements per 16 bytes when both caches' base pointers and block / slot / head
    strides are 16-byte aligned (every engine-allocated cache), else 1."""
    vec = 16 // k_cache.element_size()
    for c in (k_cache, v_cache):
        if c.data_ptr() % 16 or any(st % vec for st in c.stride()[:3]):
            return 1
    return vec


def _reduce_config(head_dim: int, min_split: int, query_len: int = 1) -> dict:
    # [MAX_SPLITS, BLOCK_D] fp32 tile = 32 regs/thread at 4 warps for D=128.
    # min_split: the split kernel's MIN_SPLIT (both compute the same live split count).
    return dict(QUERY_LEN=query_len, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                SPLITS_PAD=MAX_SPLITS, MIN_SPLIT=min_split, num_warps=4, num_stages=1)


def sm_count(device: torch.device) -> int:
    """Number of SMs of ``device`` (a fixed H100 count off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


def pick_num_splits(batch: int, num_kv_heads: int, max_context_len: int, block_size: int,
                    num_sms: int) -> int:
    """How many splits of the context a (B, Hkv) decode step gets.

    Enough programs for PROGRAMS_PER_SM per SM, but no split shorter than
    MIN_KEYS_PER_SPLIT keys (rounded to whole pages), and at most MAX_SPLITS.
    A CUDA-graph runner calls this with the capture's batch size and largest
    context and passes the result as ``num_splits``.
    """
    programs = max(1, batch * num_kv_heads)
    want = triton.cdiv(PROGRAMS_PER_SM * num_sms, programs)
    min_keys = triton.cdiv(MIN_KEYS_PER_SPLIT, block_size) * block_size
    by_len = triton.cdiv(max(1, max_context_len), min_keys)
    return max(1, min(want, by_len, MAX_SPLITS))


# ----------------------------------------------------------------------------- launcher

def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"decode_attention: {name} is on {t.device}, q is on {device}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float, num_splits: int | None = None
                     ) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D] -> [B, Hq, D]; with ``meta.query_lens`` (a
    verify step) Q = meta.max_query_len rows each, q [B * Q, Hq, D] -> [B * Q, Hq, D].
    See the module docstring.

    ``num_splits``: None picks it from (B, Hkv, meta.max_context_len, SM count);
    an explicit value (1..MAX_SPLITS) fixes the grid, as CUDA-graph capture needs.
    """
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"decode_attention: q dtype must be fp16/bf16/fp32, got {q.dtype}")
    T, Hq, D = q.shape
    dev = q.device
    B, Q = meta.context_lens.shape[0], meta.decode_query_len
    if not isinstance(Q, int) or not 1 <= Q <= 64:
        raise ValueError(f"decode_attention: meta.max_query_len must be an int in 1..64 with "
                         f"meta.query_lens, got {Q!r}")
    if T != B * Q:
        raise ValueError(f"decode_attention: q has {T} rows; meta describes {B} sequences x {Q} "
                         "query rows")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4:
            raise ValueError(f"decode_attention: {name} must be [num_blocks, block_size, Hkv, D], "
                             f"got shape {tuple(c.shape)}")
        if c.dtype != q.dtype:
            raise ValueError(f"decode_attention: {name} dtype {c.dtype} != q dtype {q.dtype}")
        if c.shape[3] != D:
            raise ValueError(f"decode_attention: {name} head_dim {c.shape[3]} != q head_dim {D}")
        if c.stride(3) != 1:
            raise ValueError(f"decode_attention: {name} must have stride(3) == 1, "
                             f"got strides {c.stride()}")
        _check_device(name, c, dev)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} shapes differ")
    _, block_size, Hkv, _ = k_cache.shape
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"decode_attention: q heads ({Hq}) must be a multiple of k_cache "
                         f"kv heads ({Hkv})")
    if q.stride(2) != 1:
        raise ValueError(f"decode_attention: q must have stride(2) == 1, got strides {q.stride()}")
    bt, ctx = meta.block_tables, meta.context_lens
    if bt.dim() != 2 or bt.shape[0] != B or bt.dtype != torch.int32:
        raise ValueError(f"decode_attention: meta.block_tables must be int32 [B={B}, max_blocks], "
                         f"got {bt.dtype} {tuple(bt.shape)}")
    if bt.shape[1] > 0 and bt.stride(1) != 1:
        raise ValueError(f"decode_attention: meta.block_tables must have stride(1) == 1, "
                         f"got strides {bt.stride()}")
    if ctx.dim() != 1 or ctx.shape[0] != B or ctx.dtype != torch.int32:
        raise ValueError(f"decode_attention: meta.context_lens must be int32 [B={B}], "
                         f"got {ctx.dtype} {tuple(ctx.shape)}")
    if not ctx.is_contiguous():
        raise ValueError("decode_attention: meta.context_lens must be contiguous")
    _check_device("meta.block_tables", bt, dev)
    _check_device("meta.context_lens", ctx, dev)
    qlens = meta.query_lens
    if qlens is not None:
        if qlens.shape != (B,) or qlens.dtype != torch.int32 or not qlens.is_contiguous():
            raise ValueError(f"decode_attention: meta.query_lens must be contiguous int32 [B={B}], "
                             f"got {qlens.dtype} {tuple(qlens.shape)}")
        _check_device("meta.query_lens", qlens, dev)
    if meta.max_context_len > bt.shape[1] * block_size:
        raise ValueError(f"decode_attention: meta.max_context_len {meta.max_context_len} exceeds "
                         f"block_tables capacity {bt.shape[1]} x block_size {block_size}")
    if num_splits is None:
        num_splits = meta.num_splits       # fixed by a CUDA-graph capture, else None
    if num_splits is None:
        num_splits = pick_num_splits(B, Hkv, meta.max_context_len, block_size, sm_count(dev))
    elif not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"decode_attention: num_splits must be an int in 1..{MAX_SPLITS}, "
                         f"got {num_splits!r}")

    out = torch.empty((T, Hq, D), dtype=q.dtype, device=dev)
    if B == 0 or Hq == 0:
        return out
    cfg = _config(Hq // Hkv, D, block_size, q.dtype, _kv_align(k_cache, v_cache), Q)
    direct = num_splits == 1
    if direct:
        part = lse = out             # unused by the DIRECT_OUT variant
    else:
        # shared by every layer of the step (same stream, so a layer's reduce has
        # read them before the next layer's split kernel overwrites them)
        key = ("triton_decode_attention_scratch", T, Hq, num_splits, D, dev)
        bufs = meta.scratch.get(key)
        if bufs is None:
            bufs = meta.scratch[key] = (
                torch.empty((T, Hq, num_splits, D), dtype=torch.float32, device=dev),
                torch.empty((T, Hq, num_splits), dtype=torch.float32, device=dev))
        part, lse = bufs
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, bt, ctx, ctx if qlens is None else qlens, out, part, lse,
        float(scale) * LOG2E, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0),
        DIRECT_OUT=direct, **cfg)
    if not direct:
        _decode_reduce_kernel[(T, Hq)](part, lse, out, ctx, num_splits,
                                       **_reduce_config(D, cfg["MIN_SPLIT"], Q))
    return out


# ----------------------------------------------------------------------------- offline specs

def _in_arg_order(kernel, signature: dict) -> dict:
    """The signature keyed in the kernel's argument order (ASTSource wants every argument)."""
    names = list(kernel.arg_names)
    assert set(names) == set(signature), (kernel.arg_names, list(signature))
    return {a: signature[a] for a in names}


# The verify steps' query length the report compiles: 1 + 4 drafts, the speculative
# default (num_speculative_tokens=4) and the k of the targets.
VERIFY_QUERY_LEN = 5


def compile_specs(shape: ModelShape) -> list[CompileSpec]:
    """The configs the launcher picks for ``shape`` (its dtype): the split kernel with
    scratch output, the num_splits == 1 variant writing out directly, and the reduce, for
    decode (one query row) and for a verify step of ``VERIFY_QUERY_LEN`` rows."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[shape.dtype]
    t = "*" + shape.dtype
    # an engine-allocated cache [NB, bs, Hkv, D] is contiguous: strides are multiples
    # of D (>= 16), base 256 B aligned -> KV_ALIGN = elements per 16 B
    kv_align = 16 // torch.empty((), dtype=dtype).element_size()
    sig = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "bt_ptr": "*i32", "ctx_ptr": "*i32", "qlen_ptr": "*i32",
           "out_ptr": t, "part_ptr": "*fp32", "lse_ptr": "*fp32",
           "scale_log2": "fp32", "num_splits": "i32",
           "stride_qb": "i32", "stride_qh": "i32",
           "stride_kb": "i32", "stride_ks": "i32", "stride_kh": "i32",
           "stride_vb": "i32", "stride_vs": "i32", "stride_vh": "i32",
           "stride_btb": "i32"}
    specs = []
    for query_len in (1, VERIFY_QUERY_LEN):
        tag = "" if query_len == 1 else f",q{query_len}"
        cfg = _config(shape.num_heads // shape.num_kv_heads, shape.head_dim, shape.block_size, dtype,
                      kv_align, query_len)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        for direct in (False, True):
            consts = dict(cfg, DIRECT_OUT=direct)
            # the direct variant gets `out` in the (unused) scratch slots, as the launcher passes
            scratch = {"part_ptr": t, "lse_ptr": t} if direct else {}
            specs.append(CompileSpec(
                kernel=_decode_split_kernel,
                name=f"decode_attention[{'direct' if direct else 'split'}{tag}]",
                signature=_in_arg_order(_decode_split_kernel,
                                        {**sig, **scratch, **{k: "constexpr" for k in consts}}),
                constexprs=consts, num_warps=warps, num_stages=stages))
        rcfg = _reduce_config(shape.head_dim, cfg["MIN_SPLIT"], query_len)
        rwarps, rstages = rcfg.pop("num_warps"), rcfg.pop("num_stages")
        specs.append(CompileSpec(
            kernel=_decode_reduce_kernel, name=f"decode_attention[reduce{tag}]",
            signature=_in_arg_order(_decode_reduce_kernel, {
                "part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": t, "ctx_ptr": "*i32",
                "num_splits": "i32",
                **{k: "constexpr" for k in rcfg}}),
            constexprs=rcfg, num_warps=rwarps, num_stages=rstages))
    return specs
