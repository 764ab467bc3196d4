"""Weight-only int8 (W8A16): quantize at load, and the matmuls that read int8 weights.

Format (``kernels.reference.quantize_int8`` is the definition): a weight W [N, K] (out
features x in features, as HF stores it) becomes ``qweight`` [N, K] int8 and ``scales``
[N] fp32, symmetric per output channel:

    scales[n]     = max_k |W[n, k]| / 127            (fp32; 0 for an all-zero row)
    qweight[n, k] = sign(y) * floor(|y| + 1/2),  y = W[n, k] / scales[n]   (in [-127, 127])

so W ~= qweight * scales[:, None], and x @ W.T = (x @ qweight.T) * scales: the scale is
applied once per output, after the K-sum. fp8 weights (``quantize_fp8`` in the
reference, e4m3 with scales max|W[n]| / 448) go through the same matmul and dequantize
kernels, whose loads convert whichever 8-bit type they read; their compiled variants
need sm_89+ (``min_arch``), and their quantization is elementwise torch (exact as is).

Kernels:

* ``_quantize_rows_kernel``: one program per row: the row's absmax, then its int8 values.
  fp32 math with IEEE division (``div_rn``), so the scales and the values are bit-exact
  against the reference.
* ``_w8a16_matmul_kernel`` (decode batches, M <= 256 rows): a [BLOCK_M, BLOCK_K]
  activation tile times a [BLOCK_N, BLOCK_K] 8-bit weight tile converted to the
  activation dtype in registers (int8 and e4m3 values are exact in fp16), accumulated in
  fp32 by ``tl.dot`` (16 rows at least: batch 1 pads to 16). At batch 1 the step is bound
  by reading the weights, so the grid must cover every SM: N/BLOCK_N output tiles alone
  are too few for the 4096-row matrices (64 tiles of 64 rows for ~132 SMs), so K is
  split too (split-K). Split partials go to an fp32 scratch [SPLIT, M, N] and
  ``_splitk_reduce_kernel`` sums them in a fixed order (no atomics: the same input gives
  the same bits on every run, which greedy decoding relies on) and applies the scales.
  Row tiles are the fastest grid axis, so a weight tile read for one row tile is still
  in L2 for the next: a batch of 64 should read the weights from DRAM about once (not
  measured), where a dequantized copy moves 5 bytes per weight (1 read, 2 written, 2
  read again).
* ``_dequantize_kernel`` (prefill, M > 256): the weight dequantized to the activation
  dtype into a temporary [N, K] buffer, then cuBLAS. At M in the hundreds and more a
  step is compute-bound and cuBLAS is the fastest matmul there is; the dequantize pass
  reads 1 byte and writes 2 per weight once per step. The buffer (the largest quantized
  matrix: gate_up, 22016 x 4096 fp16 = 180 MB on the 7B) is a plain allocation of the
  forward, so ``kv_sizing``'s profile run counts it.

Block sizes are chosen, not measured: no GPU was lent while this was written (see
``_TILES``). The offline gate compiles each for sm_80 and sm_90 (fp8: sm_90) with no spills.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.common import CompileSpec, ModelShape

MAX_KERNEL_ROWS = 256       # above: dequantize, then cuBLAS (prefill)


@triton.jit
def _quantize_rows_kernel(w_ptr, q_ptr, s_ptr, K, stride_w, stride_q, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + row * stride_w + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(w))
    # IEEE division (div_rn) for the scale too: a plain `/` compiles to an approximate fp32
    # division on the GPU, which the interpreter and CPU torch never show; a scale one ulp
    # off changes the rounding of values near a half.
    scale = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
    div = tl.where(scale == 0.0, 1.0, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + row * stride_w + offs, mask=offs < K, other=0.0).to(tl.float32)
        y = tl.math.div_rn(w, tl.zeros([BLOCK_K], dtype=tl.float32) + div)
        q = tl.minimum(tl.floor(tl.abs(y) + 0.5), 127.0)
        q = tl.where(y < 0, -q, q)
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.int8), mask=offs < K)
    tl.store(s_ptr + row, scale)


# M (the step's row count) changes every step: not specialized. Everything else is a
# model constant. Grid: (row tiles, column tiles, K splits). Row tiles vary fastest, so
# the programs that read one weight tile for different rows run side by side and the
# later ones find it in L2.
@triton.jit(do_not_specialize=["M"])
def _w8a16_matmul_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, M, N, K, stride_x, stride_w, stride_out,
                       K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)   # [BM, BK]
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)   # [BN, BK] 8-bit
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)              # [BM, BN]
    if not SPLIT_K:
        s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        out = acc * s[None, :]
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        part = part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(part, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(part_ptr, s_ptr, out_ptr, M, N, stride_out, SPLIT, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(SPLIT):                        # a fixed order: deterministic
        acc += tl.load(part_ptr + (k * M + m).to(tl.int64) * N + offs, mask=ok, other=0.0)
    s = tl.load(s_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + m.to(tl.int64) * stride_out + offs, (acc * s).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, w_ptr, K, stride_q, stride_w, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = offs < K
    q = tl.load(q_ptr + row * stride_q + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + row)
    tl.store(w_ptr + row * stride_w + offs, (q * s).to(w_ptr.dtype.element_ty), mask=ok)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_WEIGHTS = {torch.int8: "*i8", torch.float8_e4m3fn: "*fp8e4nv"}     # 8-bit weight storage
_TL = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Programs the matmul grid aims for: 4 per SM of an H100/H200 (132 SMs), so every SM has
# loads in flight while others wait on memory. Fixed rather than read from the device, so
# the split (and so the bits of the result) is the same on every GPU and in the
# interpreter.
_TARGET_PROGRAMS = 4 * 132
_QUANT_BLOCK = 1024          # 1024 fp32 per program and loop: 8 per thread at 4 warps
_DEQUANT_BLOCK = 1024
_REDUCE_BLOCK = 1024


# (rows up to, BLOCK_M, BLOCK_N, BLOCK_K, num_warps) per activation dtype: the largest
# tiles that compile with no spills for sm_80 and sm_90 (offline, registers sm_80/sm_90):
#   fp16/bf16  16 x 64 x 128, 8 warps: 239/205   (4 warps: spills 72 B on sm_80)
#              32 x 64 x 64,  8 warps: 161/160   (x 128: spills 192 B at 4 warps, 8 B in bf16 at 8)
#              64 x 64 x 64,  8 warps: 200/169   (BLOCK_K 128: spills 136 B)
#   fp32       16 x 64 x 64 and 32 x 64 x 32 (beyond 32 rows too), 8 warps (64 x 64 x 32
#              spills 24 B on sm_90 under Triton 3.9, 64 x 64 x 64 2568 B on sm_80)
# BLOCK_K 128 at M <= 16: a warp reads 128 contiguous bytes of a weight row per load.
_TILES = {"half": ((16, 16, 64, 128, 8), (32, 32, 64, 64, 8), (MAX_KERNEL_ROWS, 64, 64, 64, 8)),
          "fp32": ((16, 16, 64, 64, 8), (MAX_KERNEL_ROWS, 32, 64, 32, 8))}


def _matmul_config(M: int, N: int, K: int, dtype) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, split, K per split, num_warps) for M rows of an [N, K]
    weight (M <= MAX_KERNEL_ROWS).

    The split is the smallest that reaches ``_TARGET_PROGRAMS`` programs with row tiles x
    column tiles x splits, in whole BLOCK_K steps: at batch 1 on the 7B, qkv (12288 x
    4096) splits 3 ways, o (4096 x 4096) 8, gate_up (22016 x 4096) 2, down (4096 x 11008)
    9. Chosen, not measured (no GPU).
    """
    tiles = _TILES["fp32" if dtype == torch.float32 else "half"]
    _, block_m, block_n, block_k, warps = next(t for t in tiles if M <= t[0])
    k_steps = triton.cdiv(K, block_k)
    tiles_mn = triton.cdiv(max(M, 1), block_m) * triton.cdiv(N, block_n)
    split = max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles_mn), k_steps))
    per = triton.cdiv(k_steps, split) * block_k
    split = triton.cdiv(K, per)
    return block_m, block_n, block_k, split, per, warps


def _check_weight(qweight: torch.Tensor, scales: torch.Tensor, name: str = "qweight") -> tuple[int, int]:
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2 or qweight.dtype not in _WEIGHTS:
        raise ValueError(f"{name} must be a 2-D int8 or float8_e4m3fn tensor [N, K], got "
                         f"{getattr(qweight, 'dtype', type(qweight).__name__)} {tuple(getattr(qweight, 'shape', ()))}")
    N, K = qweight.shape
    if qweight.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {qweight.stride()}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (N,):
        raise ValueError(f"scales must be an fp32 tensor [{N}], got "
                         f"{getattr(scales, 'dtype', type(scales).__name__)} {tuple(getattr(scales, 'shape', ()))}")
    if scales.stride(0) != 1 and N > 1:
        raise ValueError("scales must be contiguous")
    return N, K


def quantize_int8(w: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> None:
    """Quantizes w [N, K] (fp16 / bf16 / fp32) into qweight [N, K] int8 and scales [N]
    fp32 in place (views of a larger fused weight are fine: rows are independent)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in _FLOATS:
        raise ValueError(f"w must be a 2-D fp16/bf16/fp32 tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    N, K = _check_weight(qweight, scales)
    if qweight.dtype != torch.int8:
        raise ValueError(f"qweight must be int8 for quantize_int8, got {qweight.dtype} (fp8: quantize_fp8)")
    if tuple(w.shape) != (N, K):
        raise ValueError(f"w has shape {tuple(w.shape)} but qweight {tuple(qweight.shape)}")
    if w.stride(1) != 1 and K > 1:
        raise ValueError(f"w must have unit column stride, got strides {w.stride()}")
    if w.device != qweight.device or w.device != scales.device:
        raise ValueError(f"w ({w.device}), qweight ({qweight.device}) and scales ({scales.device}) "
                         "must be on one device")
    if N == 0:
        return
    block = min(_QUANT_BLOCK, triton.next_power_of_2(max(K, 16)))
    _quantize_rows_kernel[(N,)](w, qweight, scales, K, w.stride(0), qweight.stride(0), BLOCK_K=block,
                                num_warps=4)


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 split: int | None = None) -> torch.Tensor:
    """x [M, K] (fp16 / bf16 / fp32) @ (qweight [N, K] int8 * scales [N, 1]).T -> [M, N]
    in x's dtype. M <= MAX_KERNEL_ROWS (decode batches): the split-K kernel (``split``
    overrides its split count, for tests); more rows (prefill): dequantize, then cuBLAS."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"x must be a 2-D fp16/bf16/fp32 tensor [M, K], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    N, K = _check_weight(qweight, scales)
    M = x.shape[0]
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} columns but qweight has K = {K}")
    if x.device != qweight.device or x.device != scales.device:
        raise ValueError(f"x ({x.device}), qweight ({qweight.device}) and scales ({scales.device}) "
                         "must be on one device")
    if M > MAX_KERNEL_ROWS:
        w = dequantize_int8(qweight, scales, x.dtype)
        return x @ w.t()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m, block_n, block_k, n_split, per, warps = _matmul_config(M, N, K, x.dtype)
    if split is not None:
        if not 1 <= split <= triton.cdiv(K, block_k):
            raise ValueError(f"split={split} must be in [1, {triton.cdiv(K, block_k)}]")
        per = triton.cdiv(triton.cdiv(K, block_k), split) * block_k
        n_split = triton.cdiv(K, per)
    part = torch.empty(n_split, M, N, dtype=torch.float32, device=x.device) if n_split > 1 else out
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    _w8a16_matmul_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n), n_split)](
        x, qweight, scales, out, part, M, N, K, x.stride(0), qweight.stride(0), out.stride(0), per,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=n_split > 1, DOT_PRECISION=prec,
        num_warps=warps)
    if n_split > 1:
        _splitk_reduce_kernel[(M, triton.cdiv(N, _REDUCE_BLOCK))](
            part, scales, out, M, N, out.stride(0), n_split, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return out


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qweight [N, K] int8, scales [N] -> a fresh [N, K] tensor of ``dtype``."""
    N, K = _check_weight(qweight, scales)
    w = torch.empty(N, K, dtype=dtype, device=qweight.device)
    if N and K:
        _dequantize_kernel[(N, triton.cdiv(K, _DEQUANT_BLOCK))](
            qweight, scales, w, K, qweight.stride(0), w.stride(0), BLOCK_K=_DEQUANT_BLOCK, num_warps=4)
    return w


def weight_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """The quantized matrices of a Llama layer: name -> (N, K)."""
    H, I, D = shape.hidden_size, shape.intermediate_size, shape.head_dim
    return {"qkv": ((shape.num_heads + 2 * shape.num_kv_heads) * D, H), "o": (H, shape.num_heads * D),
            "gate_up": (2 * I, H), "down": (H, I)}


# Row counts whose configurations cover every one the launcher can pick (each tier's
# smallest and largest M: the split only shrinks as M grows).
_SPEC_ROWS = (1, 16, 17, 32, 33, 64, 65, 128, 129, 256)


def compile_specs(shape: ModelShape) -> list[CompileSpec]:
    """Every configuration the launchers pick for ``shape``'s matrices (plus, with the
    fp16 shapes, the fp32-activation GEMV the GPU tests run)."""
    dt = _TORCH[shape.dtype]
    p = _TL[dt]
    i32 = "i32"
    specs, seen = [], set()
    mats = [(name, N, K, dt) for name, (N, K) in weight_shapes(shape).items()]
    if dt == torch.float16:
        mats += [(f"{name},fp32", N, K, torch.float32) for name, (N, K) in weight_shapes(shape).items()]
    # fp8 weights: the same kernels reading e4m3, built only for sm_89+ (min_arch)
    for wname, wptr, min_arch in (("", "*i8", None), ("fp8,", "*fp8e4nv", 89)):
        for name, N, K, mdt in mats:
            pm = _TL[mdt]
            for M in _SPEC_ROWS:
                block_m, block_n, block_k, split, _, warps = _matmul_config(M, N, K, mdt)
                key = (wptr, block_m, block_n, block_k, split > 1, mdt)
                if key in seen:
                    continue
                seen.add(key)
                sig = {"x_ptr": pm, "w_ptr": wptr, "s_ptr": "*fp32", "out_ptr": pm,
                       "part_ptr": "*fp32" if split > 1 else pm, "M": i32, "N": i32, "K": i32, "stride_x": i32,
                       "stride_w": i32, "stride_out": i32, "K_PER_SPLIT": i32, "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "SPLIT_K": "constexpr",
                       "DOT_PRECISION": "constexpr"}
                specs.append(CompileSpec(_w8a16_matmul_kernel, f"w8a16_matmul[{wname}{name},M<={M}]", sig,
                                         {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                          "SPLIT_K": split > 1,
                                          "DOT_PRECISION": "ieee" if mdt == torch.float32 else "tf32"}, warps, 2,
                                         min_arch=min_arch))
        specs.append(CompileSpec(_dequantize_kernel, f"w8a16_dequantize{'[fp8]' if min_arch else ''}",
                                 {"q_ptr": wptr, "s_ptr": "*fp32", "w_ptr": p, "K": i32, "stride_q": i32,
                                  "stride_w": i32, "BLOCK_K": "constexpr"}, {"BLOCK_K": _DEQUANT_BLOCK}, 4, 2,
                                 min_arch=min_arch))
    specs.append(CompileSpec(_splitk_reduce_kernel, "w8a16_splitk_reduce",
                             {"part_ptr": "*fp32", "s_ptr": "*fp32", "out_ptr": p, "M": i32, "N": i32,
                              "stride_out": i32, "SPLIT": i32, "BLOCK": "constexpr"},
                             {"BLOCK": _REDUCE_BLOCK}, 4, 2))
    for src in ("*fp16", "*bf16", "*fp32"):
        K = max(shape.hidden_size, shape.intermediate_size)
        specs.append(CompileSpec(_quantize_rows_kernel, f"quantize_int8[{src[1:]}]",
                                 {"w_ptr": src, "q_ptr": "*i8", "s_ptr": "*fp32", "K": i32, "stride_w": i32,
                                  "stride_q": i32, "BLOCK_K": "constexpr"},
                                 {"BLOCK_K": min(_QUANT_BLOCK, triton.next_power_of_2(max(K, 16)))}, 4, 2,
                                 exact=True))
    return specs
