"""SwiGLU activation: silu(gate) * up on the fused gate_up matmul output.

Shapes and strides:
  gate_up  [T, 2I]  fp16 / bf16 / fp32; gate in columns [0, I), up in [I, 2I);
                    any row stride, column stride 1.
  out      [T, I]   fresh contiguous tensor of gate_up's dtype.

Math in fp32, rounded once: out = (g / (1 + exp(-g))) * u. (The reference rounds
silu(g) to the dtype before the multiply, so fp16/bf16 results may differ from it
by about one ulp; ours is the more accurate one.)

Parallelisation: a 2-D grid (row, column chunk of BLOCK), so a decode step with a
handful of rows still spreads I = 11008..14336 columns over many programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.common import CompileSpec, ModelShape


# Specialization (see kernels/triton/common.py): I and both row strides are model
# constants, so every hint is kept.
@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, I, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g_ptrs = gu_ptr + row * stride_gu + cols
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _config(I: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for I output columns.

    BLOCK = 1024 columns (fewer, a power of two, when I is small) with 4 warps:
    8 elements per thread, i.e. one 16-byte load of gate and one of up per thread
    in fp16 -- the standard shape for a bandwidth-bound elementwise op. Chunks of
    1024 give ~11-14 programs per row at Llama's I, enough to fill the SMs already
    at a few decode rows, and little masked waste on the last chunk (I = 11008 is
    10.75 chunks). Not measured on a GPU here.
    """
    block = min(1024, triton.next_power_of_2(I))
    num_warps = max(1, min(4, block // 256))
    return block, num_warps


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first, then up) -> silu(gate) * up [T, I]."""
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 2:
        raise ValueError(f"gate_up must be a 2-D tensor [T, 2I], got "
                         f"{tuple(getattr(gate_up, 'shape', ()))}")
    if gate_up.dtype not in _FLOATS:
        raise ValueError(f"gate_up must be fp16, bf16 or fp32, got {gate_up.dtype}")
    T, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"gate_up's last dimension must be even (2I), got {two_i}")
    if two_i > 1 and gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must have unit column stride, got strides {gate_up.stride()}")
    I = two_i // 2
    out = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device)
    if T == 0 or I == 0:
        return out
    block, num_warps = _config(I)
    grid = (T, triton.cdiv(I, block))
    _silu_and_mul_kernel[grid](gate_up, out, I, gate_up.stride(0), out.stride(0),
                               BLOCK=block, num_warps=num_warps)
    return out


def compile_specs(shape: ModelShape) -> list[CompileSpec]:
    """The launcher's configuration for ``shape`` (activations in shape.dtype)."""
    p = _TL[_TORCH[shape.dtype]]
    block, num_warps = _config(shape.intermediate_size)
    sig = {"gu_ptr": p, "out_ptr": p, "I": "i32", "stride_gu": "i32", "stride_out": "i32",
           "BLOCK": "constexpr"}
    return [CompileSpec(_silu_and_mul_kernel, "silu_and_mul", sig, {"BLOCK": block}, num_warps, 2)]
