"""GEMV for decode: x [M, K] @ W.T with M <= 16 rows and fp16 / bf16 / fp32 or 8-bit weights.

At batch 1 to 16 a decode step reads every weight once and does 1 to 16 multiply-adds
with it: the matmul is a weight stream, and what decides its speed is how many bytes are
in flight per SM, not arithmetic. ``_gemv_kernel`` is written for that:

* **One program per slab of ``BLOCK_N`` weight rows, over the whole K.** Each K step loads
  a [BLOCK_N, BLOCK_K] tile, contiguous along K (a row of it is BLOCK_K * 2 bytes in
  fp16: each thread issues 16-byte vector loads), converts it to fp32 in registers, and
  reuses it for every activation row. No ``tl.dot``: nothing is padded to 16 rows.
* **No split-K, so no reduce.** ``BLOCK_N`` is chosen per matrix so that N / BLOCK_N
  reaches ``_TARGET_PROGRAMS`` (4 per SM of a 132-SM H100/H200) where it can: the 7B's
  4096-row matrices get 4-row slabs (1024 programs), the 12288-row qkv and larger get
  8-row slabs. Each output is then the sum of one program's K loop, in one fixed order.
* **Batch-invariant bits.** The activation rows are a dynamic loop inside the K step (M
  changes every step: not specialized, one compiled variant for M = 1..16), each row
  reduced exactly as if it were alone, so row m's output has the same bits at every M:
  greedy decoding gives the same tokens whatever else is in the batch.
* **8-bit weights** (int8, or fp8 e4m3 on sm_89+) are converted in registers like the
  half ones; the per-channel scale multiplies the fp32 sum once, in the epilogue.

Block sizes are chosen, not measured (no GPU was lent while this was written): the GPU
check's sweep measures this kernel against cuBLAS per shape, and the engine uses it only
where that table says it wins (``kernels.ops.gemv_max_rows``). Registers and spills come from
the offline compile (``compile_specs``, gated for sm_80 and sm_90).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.common import CompileSpec, ModelShape
from kernels.triton.w8a16 import weight_shapes

MAX_ROWS = 16               # activation rows this kernel takes (decode batches, small verifies)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_out,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAX_M: tl.constexpr, HAS_SCALES: tl.constexpr,
                 SILU_MUL: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.arange(0, MAX_M)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([MAX_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        for m in range(M):                                         # the same order for every row
            x_row = x_ptr + m * stride_x + offs_k
            if SILU_MUL:        # x is gate_up [M, 2K]: silu(gate) * up, rounded as silu_and_mul's output
                g = tl.load(x_row, mask=k_ok, other=0.0).to(tl.float32)
                u = tl.load(x_row + K, mask=k_ok, other=0.0).to(tl.float32)
                x = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty).to(tl.float32)
            else:
                x = tl.load(x_row, mask=k_ok, other=0.0).to(tl.float32)
            part = tl.sum(w * x[None, :], axis=1)                  # [BLOCK_N]
            acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
    if HAS_SCALES:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & n_ok[None, :])


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_EIGHT_BIT = (torch.int8, torch.float8_e4m3fn)
_TL = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
       torch.int8: "*i8", torch.float8_e4m3fn: "*fp8e4nv"}
# 4 programs per SM of a 132-SM H100/H200, as w8a16's grid: fixed, not read from the
# device, so the slab width (and the bits) is the same on every GPU and in the interpreter.
_TARGET_PROGRAMS = 4 * 132
_SLAB_ROWS = (8, 4, 2, 1)   # BLOCK_N, widest first
# 512 columns per K step: a half row of the tile is 1 KB, so 4 warps read a [8, 512] fp16
# tile with 2 16-byte loads per thread, and the fp32 copy is 32 registers per thread.
_BLOCK_K = 512
_WARPS = 4


def gemv_config(N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [N, K] weight: the widest slab that still gives
    ``_TARGET_PROGRAMS`` programs (the narrowest, 1 row, below that)."""
    block_n = next((b for b in _SLAB_ROWS if triton.cdiv(N, b) >= _TARGET_PROGRAMS), _SLAB_ROWS[-1])
    block_k = min(_BLOCK_K, triton.next_power_of_2(max(K, 16)))
    return block_n, block_k, _WARPS


def gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None,
         block_n: int | None = None, silu_mul: bool = False) -> torch.Tensor:
    """x [M, K] (fp16 / bf16 / fp32, M <= 16) @ W.T -> [M, N] in x's dtype, summed in fp32.

    ``w`` [N, K] is either a float matrix of x's dtype (``scales`` None), or 8-bit
    (int8, float8_e4m3fn) with per-output-row ``scales`` [N] fp32: W = w * scales[:, None].
    ``block_n`` overrides the slab width (tests: a real matrix's slab on fewer rows);
    ``silu_mul``: x is gate_up [M, 2K] (``silu_mul_gemv``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"x must be a 2-D fp16/bf16/fp32 tensor [M, K], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    M = x.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got x with {M} (use a matmul)")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D tensor [N, K], got {type(w).__name__} "
                         f"{tuple(getattr(w, 'shape', ()))}")
    N, K = w.shape
    if x.shape[1] != (2 * K if silu_mul else K):
        raise ValueError(f"x has {x.shape[1]} columns but w has K = {K}")
    if w.dtype in _EIGHT_BIT:
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (N,):
            raise ValueError(f"an 8-bit w needs scales: an fp32 tensor [{N}], got "
                             f"{getattr(scales, 'dtype', type(scales).__name__)} "
                             f"{tuple(getattr(scales, 'shape', ()))}")
        if scales.stride(0) != 1 and N > 1:
            raise ValueError("scales must be contiguous")
    elif w.dtype == x.dtype:
        if scales is not None:
            raise ValueError(f"scales are for 8-bit weights; w is {w.dtype}")
    else:
        raise ValueError(f"w must be {x.dtype} (x's dtype), int8 or float8_e4m3fn, got {w.dtype}")
    if w.stride(1) != 1 and K > 1:
        raise ValueError(f"w must have unit column stride, got strides {w.stride()}")
    if x.device != w.device or (scales is not None and scales.device != w.device):
        raise ValueError(f"x ({x.device}), w ({w.device}) and scales "
                         f"({None if scales is None else scales.device}) must be on one device")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    if x.stride(1) != 1:
        x = x.contiguous()
    widest, block_k, warps = gemv_config(N, K)
    if block_n is None:
        block_n = widest
    elif block_n not in _SLAB_ROWS:
        raise ValueError(f"block_n must be one of {_SLAB_ROWS}, got {block_n}")
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, w, scales if scales is not None else w, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, MAX_M=MAX_ROWS, HAS_SCALES=scales is not None, SILU_MUL=silu_mul,
        num_warps=warps)
    return out


def silu_mul_gemv(gate_up: torch.Tensor, w: torch.Tensor, scales: torch.Tensor | None = None,
                  block_n: int | None = None) -> torch.Tensor:
    """``gemv(silu_and_mul(gate_up), w, scales)`` in one kernel: gate_up [M, 2K] (gate, then
    up) -> [M, N]. The MLP's down projection with its activation as the prologue: the
    [M, K] activation is never written; each program recomputes its columns from gate_up
    (rounded to gate_up's dtype, as silu_and_mul's output is)."""
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be a 2-D tensor [M, 2K], got {tuple(getattr(gate_up, 'shape', ()))}")
    if isinstance(w, torch.Tensor) and w.dim() == 2 and gate_up.shape[1] != 2 * w.shape[1]:
        raise ValueError(f"gate_up has {gate_up.shape[1]} columns but w has K = {w.shape[1]} (expected 2K)")
    return gemv(gate_up, w, scales, block_n, silu_mul=True)


def matrix_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """A Llama layer's projections (``w8a16.weight_shapes``) and the head: name -> (N, K)."""
    return {**weight_shapes(shape), "lm_head": (shape.vocab_size, shape.hidden_size)}


def compile_specs(shape: ModelShape) -> list[CompileSpec]:
    """Every configuration the launcher picks for ``shape``'s matrices: the model's dtype
    with its own weights and with int8 / fp8 (sm_89+) ones."""
    act = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[shape.dtype]
    specs, seen = [], set()
    for wdt, min_arch in ((act, None), (torch.int8, None), (torch.float8_e4m3fn, 89)):
        for name, (N, K) in matrix_shapes(shape).items():
            block_n, block_k, warps = gemv_config(N, K)
            for silu_mul in ((False, True) if name == "down" else (False,)):   # down: with its activation
                key = (wdt, block_n, block_k, silu_mul)
                if key in seen:
                    continue
                seen.add(key)
                wname = "" if wdt == act else f"{str(wdt).split('.')[-1]},"
                sig = {"x_ptr": _TL[act], "w_ptr": _TL[wdt],
                       "s_ptr": "*fp32" if wdt in _EIGHT_BIT else _TL[wdt], "out_ptr": _TL[act], "M": "i32",
                       "N": "i32", "K": "i32", "stride_x": "i32", "stride_w": "i32", "stride_out": "i32",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "MAX_M": "constexpr",
                       "HAS_SCALES": "constexpr", "SILU_MUL": "constexpr"}
                specs.append(CompileSpec(_gemv_kernel,
                                         f"gemv[{wname}{name}{',silu_mul' if silu_mul else ''},N={block_n}]", sig,
                                         {"BLOCK_N": block_n, "BLOCK_K": block_k, "MAX_M": MAX_ROWS,
                                          "HAS_SCALES": wdt in _EIGHT_BIT, "SILU_MUL": silu_mul}, warps, 2,
                                         min_arch=min_arch))
    return specs
