"""Fused RoPE (HF half-rotation) on q and k + paged KV-cache write of k and v.

Shapes and strides (D = head_dim, even):
  q        [T, Hq, D]   fp16 / bf16 / fp32; rotated IN PLACE. Any token / head strides,
                        unit stride along D. Usually a view of the fused qkv matmul output
                        [T, (Hq + 2 Hkv) D]: token stride (Hq + 2 Hkv) D, head stride D.
  k, v     [T, Hkv, D]  q's dtype, same stride rules; k rotated IN PLACE, v read only.
  cos, sin [T, D]       the tokens' rows of ``rope_cos_sin`` (HF layout: the D/2
                        frequencies duplicated), any dtype among fp16/bf16/fp32 (the model
                        passes q's dtype); any row stride, unit column stride.
  k_cache, v_cache [num_blocks, block_size, Hkv, D]  q's dtype; any strides with unit
                        stride along D (offsets are int64: num_blocks * block stride may
                        exceed 2^31).
  slot_mapping [T] int64: slot s -> block s // block_size, offset s % block_size;
                        -1 = padding, its k/v are not stored (q/k are still rotated).

Arithmetic: for each head, with x1 = x[:D/2], x2 = x[D/2:]:
  out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2]
  out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:]
i.e. x * cos + rotate_half(x) * sin, computed in fp32 and rounded once (the reference
rounds after each torch op in fp16/bf16, so results may differ from it by ~1 ulp).
The rotated k written to the cache is bit-identical to the rotated k left in ``k``.

Parallelisation: grid (T, ceil(Hq / BLOCK_H) + ceil(Hkv / BLOCK_H)). Program (t, c)
rotates q heads [c*BLOCK_H, ...) of token t, or, for c past the q chunks, rotates a
chunk of k heads and stores those k and v heads into the token's cache slot. Every
program touches disjoint memory, so the aliasing of q/k/v in one qkv buffer is safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.common import CompileSpec, ModelShape


@triton.jit
def _rotate_heads(x_ptr, row_off, h0, n_heads, stride_h, c1, s1, c2, s2,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates heads [h0, h0 + BLOCK_H) of one token in place; returns the rotated halves
    (in x's dtype), their element offsets inside a head-row and the mask."""
    heads = h0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (d[None, :] < HALF)
    ptrs = x_ptr + row_off + heads[:, None] * stride_h + d[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c1[None, :] - x2 * s1[None, :]).to(x_ptr.dtype.element_ty)
    o2 = (x2 * c2[None, :] + x1 * s2[None, :]).to(x_ptr.dtype.element_ty)
    tl.store(ptrs, o1, mask=mask)
    tl.store(ptrs + HALF, o2, mask=mask)
    return o1, o2, heads, d, mask


# Every int here is a model constant (head counts, block size, strides of the fused qkv
# output, of cos/sin rows and of the caches), so all keep their specialization. The one
# thing that changes between steps is slot_ptr's alignment: a decode step's slots are a
# slice of a packed staging buffer, 16-byte aligned or not with the batch size. It is read
# one int64 per program, so the alignment hint is worthless and only costs a variant.
@triton.jit(do_not_specialize_on_alignment=["slot_ptr"])
def _rope_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
        n_q_heads, n_kv_heads, block_size,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_cos, stride_sin,
        stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_q_chunks = tl.cdiv(n_q_heads, BLOCK_H)

    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    c_row = cos_ptr + t * stride_cos
    s_row = sin_ptr + t * stride_sin
    c1 = tl.load(c_row + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF + d, mask=dmask, other=0.0).to(tl.float32)

    if chunk < n_q_chunks:
        _rotate_heads(q_ptr, t * stride_qt, chunk * BLOCK_H, n_q_heads, stride_qh,
                      c1, s1, c2, s2, HALF, BLOCK_H, BLOCK_HALF)
    else:
        h0 = (chunk - n_q_chunks) * BLOCK_H
        k1, k2, heads, dd, _ = _rotate_heads(k_ptr, t * stride_kt, h0, n_kv_heads, stride_kh,
                                                c1, s1, c2, s2, HALF, BLOCK_H, BLOCK_HALF)
        slot = tl.load(slot_ptr + t)                       # int64
        keep = slot >= 0
        slot = tl.where(keep, slot, 0)                     # no negative offsets, even masked
        blk = slot // block_size
        off = slot % block_size
        # padding token: store no head (folding the condition into the head limit also
        # avoids a scalar-i1 & tensor-i1 broadcast, which the interpreter mistypes)
        n_store = tl.where(keep, n_kv_heads, 0)
        smask = (heads[:, None] < n_store) & (dd[None, :] < HALF)
        kc = kc_ptr + blk * stride_kcb + off * stride_kcs + heads[:, None] * stride_kch + dd[None, :]
        tl.store(kc, k1, mask=smask)
        tl.store(kc + HALF, k2, mask=smask)
        v_src = v_ptr + t * stride_vt + heads[:, None] * stride_vh + dd[None, :]
        v1 = tl.load(v_src, mask=smask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=smask, other=0.0)
        vc = vc_ptr + blk * stride_vcb + off * stride_vcs + heads[:, None] * stride_vch + dd[None, :]
        tl.store(vc, v1, mask=smask)
        tl.store(vc + HALF, v2, mask=smask)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _config(n_q_heads: int, n_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps).

    BLOCK_HALF: D/2 padded to a power of two (a program loads the two halves of each
    head as separate tiles, which makes rotate_half a pure register operation).
    BLOCK_H: heads per program, so that a program moves ~1024 elements per tensor
    (8 heads at D = 128): Hq = 32 gives 4 q + 4 kv programs per token, so even a
    decode step of one sequence spreads over several SMs, while a 4096-token prefill
    still has only ~32k small programs. Capped at the head counts (tiny test models).
    num_warps: ~4 elements per thread per half-tile (up to 4 warps); this op is pure
    bandwidth with no reuse, so more warps per program buy nothing. Not measured on
    a GPU here.
    """
    block_half = triton.next_power_of_2(max(1, head_dim // 2))
    block_h = max(1, min(1024 // (2 * block_half), triton.next_power_of_2(max(n_q_heads, n_kv_heads))))
    num_warps = max(1, min(4, (block_h * block_half) // 128))
    return block_h, block_half, num_warps


def _check(name: str, t, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, "
                         f"got strides {t.stride()}")


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place with each token's cos/sin
    rows [T, D] and stores k and v [T, Hkv, D] into the cache slots ``slot_mapping``
    [T]; slot -1 is skipped. Same arithmetic as HF: x * cos + rotate_half(x) * sin
    (in fp32, rounded once). Slots are not range-checked (that would need a host
    sync): a slot >= num_blocks * block_size writes out of bounds."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(name, t, 3)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(name, t, 4)
    _check("cos", cos, 2)
    _check("sin", sin, 2)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if D % 2:
        raise ValueError(f"q: head_dim must be even, got {D}")
    if q.dtype not in _FLOATS:
        raise ValueError(f"q must be fp16, bf16 or fp32, got {q.dtype}")
    if tuple(k.shape) != (T, Hkv, D) or tuple(v.shape) != (T, Hkv, D):
        raise ValueError(f"k and v must be [T={T}, Hkv, D={D}] alike, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (T, D):
            raise ValueError(f"{name} must be [T={T}, D={D}], got {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if cos.dtype != sin.dtype:
        raise ValueError(f"cos ({cos.dtype}) and sin ({sin.dtype}) must share a dtype")
    bs = k_cache.shape[1]
    if tuple(k_cache.shape[2:]) != (Hkv, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [num_blocks, block_size, Hkv={Hkv}, D={D}] "
                         f"alike, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be an int64 tensor, got "
                         f"{getattr(slot_mapping, 'dtype', type(slot_mapping).__name__)}")
    if tuple(slot_mapping.shape) != (T,):
        raise ValueError(f"slot_mapping must be [T={T}], got {tuple(slot_mapping.shape)}")
    for name, t in (("k", k), ("v", v), ("cos", cos), ("sin", sin), ("k_cache", k_cache),
                    ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if T == 0:
        return
    slots = slot_mapping if slot_mapping.stride(0) == 1 or T == 1 else slot_mapping.contiguous()
    block_h, block_half, num_warps = _config(Hq, Hkv, D)
    grid = (T, triton.cdiv(Hq, block_h) + triton.cdiv(Hkv, block_h))
    _rope_write_kv_kernel[grid](
        q, k, v, cos, sin, k_cache, v_cache, slots,
        Hq, Hkv, bs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=D // 2, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps)


def compile_specs(shape: ModelShape) -> list[CompileSpec]:
    """The launcher's configuration for ``shape`` (q/k/v, cos/sin and caches in shape.dtype)."""
    p = _TL[_TORCH[shape.dtype]]
    block_h, block_half, num_warps = _config(shape.num_heads, shape.num_kv_heads, shape.head_dim)
    sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "cos_ptr": p, "sin_ptr": p, "kc_ptr": p,
           "vc_ptr": p, "slot_ptr": "*i64"}
    for name in ("n_q_heads", "n_kv_heads", "block_size", "stride_qt", "stride_qh", "stride_kt",
                 "stride_kh", "stride_vt", "stride_vh", "stride_cos", "stride_sin",
                 "stride_kcb", "stride_kcs", "stride_kch", "stride_vcb", "stride_vcs",
                 "stride_vch"):
        sig[name] = "i32"
    consts = {"HALF": shape.head_dim // 2, "BLOCK_H": block_h, "BLOCK_HALF": block_half}
    sig.update({c: "constexpr" for c in consts})
    return [CompileSpec(_rope_write_kv_kernel, "rope_and_write_kv", sig, consts, num_warps, 2)]
