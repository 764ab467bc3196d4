"""Causal prefill attention over the paged KV cache (flash attention, online softmax).

Same semantics and signature as ``kernels.reference.prefill_attention``.

Shapes and strides (element strides; the last dim of every tensor must be contiguous):
  q             [T, Hq, D]        fp16/bf16/fp32, strides (stride_qt, stride_qh, 1); may be a
                                  view into a fused qkv buffer (stride_qt = (Hq + 2*Hkv) * D).
  k_cache       [NB, bs, Hkv, D]  q's dtype, strides (stride_kb, stride_ks, stride_kh, 1)
  v_cache       [NB, bs, Hkv, D]  q's dtype, strides (stride_vb, stride_vs, stride_vh, 1)
  block_tables  [B, max_blocks]   int32, strides (stride_bt, 1); position p of sequence i lives in
                                  page block_tables[i, p // bs], row p % bs.
  context_lens  [B]               int32, contiguous: positions sequence i attends to.
  query_start_loc [B + 1]         int32, contiguous (cu_seqlens_q); sequence i's queries are
                                  q[qsl[i]:qsl[i+1]], its LAST q_len_i positions, i.e. query j
                                  sits at position ctx_i - q_len_i + j and sees keys 0..itself.
  out           [T, Hq, D]        new, contiguous, q's dtype: strides (Hq * D, D, 1).

Grid: (query tiles, Hq); every program owns BLOCK_M consecutive queries of one sequence and one
query head. Two ways to name the tiles (USE_MAP, one kernel):
  dense (USE_MAP=False): grid (B * n_q_tiles, n_q_tiles = cdiv(max_query_len, BLOCK_M)),
      pid0 = j * B + seq, tile = n_q_tiles - 1 - j; programs past a sequence's end exit at once.
      Needs nothing from the device (B is a shape, max_query_len a host int): no sync, no
      upload. Used when the batch is not very ragged, i.e. when the empty programs are at most
      about as many as the real ones (B * n_q_tiles <= 2 * cdiv(T, BLOCK_M) + B).
  map (USE_MAP=True): a ragged batch (one long prompt among many short ones would launch
      B * n_q_tiles * Hq mostly empty CTAs) reads query_start_loc / context_lens on the host
      once per step, builds an int32 [n_tiles, 2] (seq, tile) map, heaviest tiles first, and
      caches it in meta.scratch for every layer of the step (one host sync per step; the
      reference syncs on every layer).
Both orders start the heaviest tiles (the last ones of each sequence, with the most keys under
the causal mask) first, so the tail of the launch is made of short programs.

Per program: the query tile stays in registers; key tiles of BLOCK_N positions are gathered
through the block table one key at a time (each key's page id is a cached int32 load) and walked
in two loops: key tiles entirely at or below the tile's first query position need no mask; the
remaining ones up to the tile's last query position get the causal mask; key tiles above the
diagonal are never visited. GQA: query head h reads kv head h // (Hq // Hkv) without any copy.
Softmax in fp32 with exp2 on scores pre-multiplied by scale * log2(e); P is cast to V's dtype
for the second dot (fp32 stays fp32, with input_precision="ieee": no TF32 rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.metadata import AttentionMetadata
from kernels.triton.common import CompileSpec, ModelShape, triton_dtype

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Not specialized (see kernels/triton/common.py): the ints that change from step to step --
# the batch size, the query-tile count of the step's longest prompt and the block-table width
# (the step's widest sequence). Specialized, a value of 1 or a multiple of 16 would compile a
# new variant mid-serving. Their hints buy nothing: num_seqs / n_q_tiles only name the tile,
# stride_bt offsets one row of scalar page-id loads.
@triton.jit(do_not_specialize=["num_seqs", "n_q_tiles", "stride_bt"])
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, context_lens_ptr, query_start_loc_ptr,
    qk_scale,                                   # scale * log2(e), fp32
    num_seqs, n_q_tiles, kv_group,              # B, cdiv(max_query_len, BLOCK_M), Hq // Hkv
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    tile_map_ptr,                               # int32 [n_tiles, 2] (seq, tile) when USE_MAP
    PAGE: tl.constexpr,                         # KV cache block_size (positions per page)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_MAP: tl.constexpr,
):
    # Alignment: the launcher checks that every pointer is 16-byte aligned and every q / cache /
    # out stride is a multiple of 16 elements. The hints below (on computed offsets: hints on
    # kernel arguments themselves are dropped) let the loads vectorise to 16 bytes even when
    # compiled without the runtime's argument specialisation (the offline report), which keeps
    # the [HEAD_DIM, BLOCK_N] gather address tensors small enough not to spill.
    pid = tl.program_id(0)
    head = tl.program_id(1)
    if USE_MAP:
        seq = tl.load(tile_map_ptr + 2 * pid)
        tile = tl.load(tile_map_ptr + 2 * pid + 1)
    else:
        seq = pid % num_seqs
        tile = n_q_tiles - 1 - pid // num_seqs  # heaviest (last) tiles first

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    first_pos = ctx - q_len + tile * BLOCK_M                     # position of the tile's query 0
    rows_here = tl.minimum(q_len - tile * BLOCK_M, BLOCK_M)
    kv_end = first_pos + rows_here                               # keys [0, kv_end) are visible
    kv_full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N         # key tiles [0, this) need no mask

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < rows_here
    q_pos = first_pos + offs_m

    q_rows = (q_start + tile * BLOCK_M + offs_m).to(tl.int64)
    q_row_off = tl.multiple_of(q_rows * stride_qt, [16])
    q_head = tl.multiple_of(q_ptr + head * stride_qh, 16)
    q = tl.load(q_head + q_row_off[:, None] + offs_d[None, :], mask=m_valid[:, None], other=0.0)

    kv_head = head // kv_group
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = tl.multiple_of(k_cache_ptr + kv_head * stride_kh, 16)
    v_head = tl.multiple_of(v_cache_ptr + kv_head * stride_vh, 16)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key tiles wholly at or below the first query's position: every row sees every key.
    # (The first tile any row visits holds a key it sees, so m_i is finite after it.)
    for start_n in range(0, kv_full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start_n + offs_n, kv_end, q_pos, bt_row, k_head, v_head, offs_d,
            qk_scale, stride_kb, stride_ks, stride_vb, stride_vs, PAGE, False)
    # Key tiles crossing the diagonal, up to the tile's last query: causal mask. Tiles above
    # the diagonal are never visited.
    for start_n in range(kv_full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start_n + offs_n, kv_end, q_pos, bt_row, k_head, v_head, offs_d,
            qk_scale, stride_kb, stride_ks, stride_vb, stride_vs, PAGE, True)

    acc = acc / l_i[:, None]
    o_row_off = tl.multiple_of(q_rows * stride_ot, [16])
    o_head = tl.multiple_of(out_ptr + head * stride_oh, 16)
    tl.store(o_head + o_row_off[:, None] + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_valid[:, None])


@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_pos, kv_end, q_pos, bt_row, k_head, v_head, offs_d,
                 qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                 PAGE: tl.constexpr, CAUSAL: tl.constexpr):
    """One key tile (positions k_pos [BLOCK_N]) of the online softmax; K/V gathered per key
    through the block table row bt_row. CAUSAL: mask keys after each query and past kv_end."""
    if CAUSAL:
        n_valid = k_pos < kv_end
        page = tl.load(bt_row + k_pos // PAGE, mask=n_valid, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + k_pos // PAGE).to(tl.int64)
    slot = k_pos % PAGE
    k_off = tl.multiple_of(page * stride_kb + slot * stride_ks, [16])
    v_off = tl.multiple_of(page * stride_vb + slot * stride_vs, [16])
    k_ptrs = k_head + k_off[None, :] + offs_d[:, None]               # [HEAD_DIM, BLOCK_N]
    v_ptrs = v_head + v_off[:, None] + offs_d[None, :]               # [BLOCK_N, HEAD_DIM]
    if CAUSAL:
        k = tl.load(k_ptrs, mask=n_valid[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, k, input_precision="ieee") * qk_scale        # [BLOCK_M, BLOCK_N] fp32
    if CAUSAL:
        s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if CAUSAL:
        v = tl.load(v_ptrs, mask=n_valid[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    return m_new, l_i, acc


def _config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head_dim and dtype.

    Not measured on a GPU (none was available): chosen from the workload and from the offline
    sm_80 / sm_90 compiles of compile_specs (registers / shared memory quoted below, Triton 3.9).
    - BLOCK_M = 64, not the 128 of long-sequence FlashAttention: prompts here are short (tens
      to a few hundred tokens) and ragged, so 128-row tiles would be mostly padding and halve
      the number of CTAs. BLOCK_N = 64 keys = 4 pages of 16.
    - 16-bit, head_dim <= 64: 4 warps (16 query rows per warp, one m16 MMA row block each),
      <= 185 registers, 24-40 KB shared memory at 2 stages.
    - 16-bit, head_dim 128: 4 warps spill on sm_80 (the fp32 64x128 accumulator, the query tile
      and the [128, 64] gather addresses of K and V); 8 warps split N between warp pairs and
      halve the accumulator per thread: 171-176 (sm_80) / 145 (sm_90) registers, no spill.
    - fp32 (the CPU-parity dtype; on a GPU only for checks): its "ieee" dots run on FMA units and
      any 32/64-row tile spills on sm_90, so a 16 x 32 tile with 8 warps (55-66 registers).
    num_stages = 2 everywhere: K/V loads become 16-byte cp.async double-buffered; prompts are
    short, so key loops are a few iterations and a third stage mostly costs shared memory (and
    spilled at head_dim 64 / 4 warps on sm_80).
    """
    if dtype == torch.float32:
        return 16, 32, 8, 2
    if head_dim >= 128:
        return 64, 64, 8, 2
    return 64, 64, 4, 2


def _aligned(t: torch.Tensor) -> bool:
    """data_ptr 16-byte aligned and every stride but the last (1) a multiple of 16 elements:
    what the kernel's tl.multiple_of hints promise. Engine tensors (caches, the fused qkv
    output and views of it, fresh outputs) always are, since head_dim >= 16 is a power of two."""
    return t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride()[:-1])


def _check(q, k_cache, v_cache, meta, scale):
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [T, Hq, D] tensor, got {getattr(q, 'shape', type(q))}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype must be one of {_DTYPES}, got {q.dtype}")
    T, Hq, D = q.shape
    if D < 16 or D > 128 or D & (D - 1):
        raise ValueError(f"q head_dim must be a power of two in [16, 128], got {D}")
    if q.stride(2) != 1:
        raise ValueError(f"q's last dim must be contiguous (stride 1), got strides {q.stride()}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor) or c.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, Hkv, D], "
                             f"got {getattr(c, 'shape', type(c))}")
        if c.dtype != q.dtype:
            raise ValueError(f"{name} dtype {c.dtype} != q dtype {q.dtype}")
        if c.device != q.device:
            raise ValueError(f"{name} is on {c.device}, q on {q.device}")
        if c.stride(3) != 1:
            raise ValueError(f"{name}'s last dim must be contiguous, got strides {c.stride()}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not _aligned(c):
            raise ValueError(f"{name} must be 16-byte aligned with strides that are multiples of "
                             f"16 elements (the kernel's vectorisation hints assume it), got "
                             f"data_ptr % 16 = {c.data_ptr() % 16}, strides {c.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} differ")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != q head_dim {D}")
    Hkv = k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads {Hq} must be a multiple of k_cache heads {Hkv}")
    if not isinstance(meta, AttentionMetadata):
        raise ValueError(f"meta must be an AttentionMetadata, got {type(meta)}")
    bt, cl, qsl = meta.block_tables, meta.context_lens, meta.query_start_loc
    B = cl.shape[0] if cl.dim() == 1 else -1
    for name, t, ndim in (("meta.block_tables", bt, 2), ("meta.context_lens", cl, 1),
                          ("meta.query_start_loc", qsl, 1)):
        if t.dtype != torch.int32 or t.dim() != ndim:
            raise ValueError(f"{name} must be a {ndim}-D int32 tensor, "
                             f"got {t.dtype} {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dim must be contiguous, got strides {t.stride()}")
    if bt.shape[0] != B or qsl.shape[0] != B + 1:
        raise ValueError(f"meta: block_tables {tuple(bt.shape)}, context_lens {tuple(cl.shape)} "
                         f"and query_start_loc {tuple(qsl.shape)} disagree on the number of "
                         "sequences")
    if not isinstance(meta.max_query_len, int) or meta.max_query_len < 0:
        raise ValueError(f"meta.max_query_len must be a host int >= 0, got {meta.max_query_len!r}")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python float, got {type(scale)}")


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention for packed queries q [T, Hq, D] -> new contiguous [T, Hq, D] in q's dtype.

    Each sequence's queries are its last q_len positions and attend to its cached prefix plus
    themselves, K/V read only through meta.block_tables. meta.max_query_len must be >= every
    sequence's query length (it sizes the grid; no device sync happens here).
    """
    return _prefill_attention(q, k_cache, v_cache, meta, scale, None)


def _tile_map(meta: AttentionMetadata, BLOCK_M: int, device) -> torch.Tensor:
    """int32 [n_tiles, 2] (seq, q-tile) of every non-empty query tile, the tiles with the most
    keys to visit first; built once per step (one host sync) and kept in meta.scratch."""
    key = ("prefill_attention.tile_map", BLOCK_M, str(device))
    cached = meta.scratch.get(key)
    if cached is not None:
        return cached
    # host copies from the runner when present: no device sync
    qsl = meta.host_query_start_loc or meta.query_start_loc.tolist()
    ctx = meta.host_context_lens or meta.context_lens.tolist()
    tiles = []
    for i, c in enumerate(ctx):
        n = qsl[i + 1] - qsl[i]
        for t in range(-(-n // BLOCK_M)):
            tiles.append((c - n + min((t + 1) * BLOCK_M, n), i, t))   # keys visited, seq, tile
    tiles.sort(key=lambda x: -x[0])
    flat = [v for _, i, t in tiles for v in (i, t)]
    tile_map = torch.tensor(flat, dtype=torch.int32).view(-1, 2).to(device)
    meta.scratch[key] = tile_map
    return tile_map


def _prefill_attention(q, k_cache, v_cache, meta, scale, use_map):
    """prefill_attention with the tile naming forced (use_map True / False) or chosen (None)."""
    _check(q, k_cache, v_cache, meta, scale)
    if not _aligned(q):     # an odd view (never made by the engine): copy rather than refuse
        q = q.contiguous()
    T, Hq, D = q.shape
    # a graph's padding rows (owned by no sequence) are never written: zeros, as the
    # reference gives, rather than whatever the pool held (one memset a layer)
    out = (torch.zeros if meta.graph_static else torch.empty)((T, Hq, D), dtype=q.dtype, device=q.device)
    B = meta.context_lens.shape[0]
    if T == 0 or B == 0 or meta.max_query_len == 0:
        return out
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config(D, q.dtype)
    n_q_tiles = triton.cdiv(meta.max_query_len, BLOCK_M)
    if use_map is None:   # a graph's step: the dense grid (the map is built from host values)
        use_map = not meta.graph_static and B * n_q_tiles > 2 * triton.cdiv(T, BLOCK_M) + B
    if use_map:
        tile_map = _tile_map(meta, BLOCK_M, q.device)
        grid = (tile_map.shape[0], Hq)
        if tile_map.shape[0] == 0:
            return out
    else:
        tile_map = meta.query_start_loc          # unused int32 pointer
        grid = (B * n_q_tiles, Hq)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out,
        meta.block_tables, meta.context_lens, meta.query_start_loc,
        float(scale) * _LOG2E,
        B, n_q_tiles, Hq // k_cache.shape[2],
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        meta.block_tables.stride(0),
        tile_map,
        PAGE=k_cache.shape[1], HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, USE_MAP=use_map,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


_STR2DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def compile_specs(shape: ModelShape) -> list[CompileSpec]:
    """The configurations prefill_attention launches for ``shape``: per activation dtype the
    engine runs on GPU (fp16, bf16, plus fp32 when it is the model's dtype), the dense-grid and
    the tile-map variant (see the module docstring)."""
    dtypes = ["fp16", "bf16"] + (["fp32"] if shape.dtype == "fp32" else [])
    specs = []
    for name in dtypes:
        dt = _STR2DTYPE[name]
        BLOCK_M, BLOCK_N, num_warps, num_stages = _config(shape.head_dim, dt)
        p = triton_dtype(dt)
        sig = {
            "q_ptr": p, "k_cache_ptr": p, "v_cache_ptr": p, "out_ptr": p,
            "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
            "qk_scale": "fp32", "num_seqs": "i32", "n_q_tiles": "i32", "kv_group": "i32",
            "stride_qt": "i32", "stride_qh": "i32",
            "stride_kb": "i32", "stride_ks": "i32", "stride_kh": "i32",
            "stride_vb": "i32", "stride_vs": "i32", "stride_vh": "i32",
            "stride_ot": "i32", "stride_oh": "i32", "stride_bt": "i32", "tile_map_ptr": "*i32",
            "PAGE": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr",
            "BLOCK_N": "constexpr", "USE_MAP": "constexpr",
        }
        for use_map in (False, True):
            const = {"PAGE": shape.block_size, "HEAD_DIM": shape.head_dim,
                     "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "USE_MAP": use_map}
            specs.append(CompileSpec(
                _prefill_attention_kernel,
                f"prefill_attention[{name},{'map' if use_map else 'dense'}]", sig, const,
                num_warps, num_stages))
    return specs
