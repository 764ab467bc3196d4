"""RMSNorm and fused residual-add + RMSNorm (Llama's pre-norms).

Shapes and strides:
  x         [T, H]  fp16 / bf16 / fp32; any row stride, column stride 1.
  residual  [T, H]  same dtype as x; any row stride, column stride 1; written in place.
  weight    [H]     contiguous; usually x's dtype (fp32 weight with fp16/bf16 x works too and
                    gives an fp32 output, as torch's type promotion does in the reference).
  out       [T, H]  fresh contiguous tensor, dtype promote(x.dtype, weight.dtype).

Numerics follow Hugging Face (and ``kernels.reference``):
  out = weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)
i.e. the statistics are fp32, the normalised row is rounded to x's dtype, and the
product with the weight is formed in fp32 from the two rounded operands and rounded
once to the output dtype. The product of two fp16 (or two bf16) values is exact in
fp32, so that last step is bit-identical to torch's; only the sum of squares (its
order) and rsqrt can differ by an ulp.

Parallelisation: one program per row; the whole row is one power-of-two block
(H <= 16384), so x is read once and the row stays in registers between the
statistics and the scaling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.common import CompileSpec, ModelShape

MAX_HIDDEN = 16384   # one row per block; 8192 (Llama-2 70B) is the largest we need


# Specialization (see kernels/triton/common.py): H and the row strides are model constants
# (every engine tensor here is a contiguous [T, H]), so both kernels keep every hint.
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, stride_x, stride_out, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    xn = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)   # HF: round to x.dtype first
    y = w * xn
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, H, stride_x, stride_res,
                               stride_out, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
    # the sum is rounded to the activation dtype (as `x + residual` in torch) and the
    # statistics are taken from the rounded sum, exactly like the reference
    s = (x + r).to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + row * stride_res + cols, s, mask=mask)
    s = s.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)
    sn = (s * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    y = w * sn
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _config(H: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of H elements.

    BLOCK: the whole row in one power-of-two block. num_warps: ~16 elements per
    thread (BLOCK // 512 warps, 1..16), i.e. two 16-byte loads per thread for
    fp16 rows -- enough bytes in flight per thread for a bandwidth-bound op while
    keeping the fp32 row (x, residual/sum, weight) well inside the register budget
    (checked offline: no spills at H=8192 / 16 warps). Not measured on a GPU here;
    it is the usual choice for row reductions (Liger / Triton's layer-norm tutorial
    use the same ~BLOCK/512 scaling).
    """
    block = triton.next_power_of_2(H)
    num_warps = max(1, min(16, block // 512))
    return block, num_warps


def _check_row_tensor(name: str, t: torch.Tensor, H: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, H], got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along H, got strides {t.stride()}")
    if H is not None and t.shape[1] != H:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {H}")


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"weight must be a 1-D tensor [H], got {getattr(weight, 'shape', weight)}")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[0]} elements, x has H={x.shape[1]}")
    if weight.dtype not in _FLOATS:
        raise ValueError(f"weight must be fp16, bf16 or fp32, got {weight.dtype}")
    if weight.shape[0] > 1 and weight.stride(0) != 1:
        raise ValueError("weight must be contiguous")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if x.shape[1] > MAX_HIDDEN:
        raise ValueError(f"x: H={x.shape[1]} exceeds the single-block limit {MAX_HIDDEN}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H], weight [H] -> [T, H]. Statistics in fp32, like HF."""
    _check_row_tensor("x", x)
    _check_weight(weight, x)
    T, H = x.shape
    out = torch.empty((T, H), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if T == 0 or H == 0:
        return out
    block, num_warps = _config(H)
    _rms_norm_kernel[(T,)](x, weight, out, H, x.stride(0), out.stride(0), float(eps),
                           BLOCK=block, num_warps=num_warps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual), residual). [T, H] each.

    IN PLACE: unlike the reference (which returns a new tensor), the sum is written
    into ``residual`` itself and that same tensor is returned; the caller must not
    rely on the old residual values afterwards (the model only keeps the returned one).
    ``x`` must not overlap ``residual``.
    """
    _check_row_tensor("x", x)
    _check_row_tensor("residual", residual, x.shape[1])
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, x {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise ValueError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device}, x on {x.device}")
    _check_weight(weight, x)
    T, H = x.shape
    out = torch.empty((T, H), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if T == 0 or H == 0:
        return out, residual
    block, num_warps = _config(H)
    _fused_add_rms_norm_kernel[(T,)](x, residual, weight, out, H, x.stride(0), residual.stride(0),
                                     out.stride(0), float(eps), BLOCK=block, num_warps=num_warps)
    return out, residual


def compile_specs(shape: ModelShape) -> list[CompileSpec]:
    """The launchers' configurations for ``shape`` (activation and weight in shape.dtype)."""
    p = _TL[_TORCH[shape.dtype]]
    block, num_warps = _config(shape.hidden_size)
    consts = {"BLOCK": block}
    sig = {"x_ptr": p, "w_ptr": p, "out_ptr": p, "H": "i32", "stride_x": "i32",
           "stride_out": "i32", "eps": "fp32", "BLOCK": "constexpr"}
    sig_f = {"x_ptr": p, "res_ptr": p, "w_ptr": p, "out_ptr": p, "H": "i32", "stride_x": "i32",
             "stride_res": "i32", "stride_out": "i32", "eps": "fp32", "BLOCK": "constexpr"}
    return [
        CompileSpec(_rms_norm_kernel, "rms_norm", sig, consts, num_warps, 2),
        CompileSpec(_fused_add_rms_norm_kernel, "fused_add_rms_norm", sig_f, consts, num_warps, 2),
    ]
