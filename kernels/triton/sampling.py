"""Sampling helpers over the vocabulary: greedy argmax and gathered log-probs.

Shapes and strides:
  logits     [N, V]  fp32 normally (fp16 / bf16 accepted, read and compared in fp32);
                     any row stride, unit column stride. V is arbitrary (32016 for
                     Llama-2 + Self-RAG tokens): rows are walked in power-of-two chunks
                     of BLOCK columns with a mask on the last one.
  token_ids  [N, K]  int64 (any strides); K >= 1, duplicates allowed.
  outputs    greedy_argmax -> [N] int64; gather_logprobs -> [N, K] fp32 (contiguous).

greedy_argmax: the FIRST index of the row's maximum, torch.argmax's rule. NaN is
treated as larger than everything (also torch.argmax's rule): a row with a NaN
returns the index of its first NaN. Rows of all -inf return 0. Each chunk's max is
taken over NaN-free values (NaNs replaced by -inf) and NaNs are tracked separately,
so the result does not depend on how the backend's max treats NaN.

gather_logprobs: log_softmax(logits)[n, ids] = logits[n, id] - logsumexp(logits[n]),
without materialising the log-softmax: one pass over the row keeps a per-lane running
max and rescaled sum of exp (online softmax, fp32), reduced to the row's logsumexp at
the end; then the K logits are gathered. A NaN anywhere in the row gives NaN (as torch);
ids outside [0, V) give NaN (no host sync to range-check them; torch would raise).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.common import CompileSpec, ModelShape


# Specialization (see kernels/triton/common.py): V and the logits' row stride are model
# constants (fp32 logits [N, V] from the lm_head matmul), so every hint is kept.
@triton.jit
def _argmax_kernel(logits_ptr, out_ptr, V, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    best_val = -float("inf")
    best_idx = 0
    first_nan = V
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=-float("inf")).to(tl.float32)
        is_nan = x != x
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, cols, V), axis=0))
        x = tl.where(is_nan, -float("inf"), x)
        m = tl.max(x, axis=0)
        # first column of this chunk holding m (masked lanes hold -inf and come last)
        idx = tl.min(tl.where(x == m, cols, V), axis=0)
        better = m > best_val          # strict: an equal max in a later chunk loses
        best_idx = tl.where(better, idx, best_idx)
        best_val = tl.where(better, m, best_val)
    res = tl.where(first_nan < V, first_nan, best_idx)
    tl.store(out_ptr + row, res.to(tl.int64))


# Not specialized (see kernels/triton/common.py): the engine gathers ids [B, 1] (the sampled
# tokens) and, in steps with a log-prob request, [n, K] (sampled + top-N + requested ids), so
# K, the ids' row stride and out's row stride switch between 1 (a constant when specialized)
# and K (a multiple of 16 or not): a new variant the first time a request asks for log-probs.
# Their hints buy nothing: at most BLOCK_K ids per row. stride_ids_k stays specialized: every
# engine call passes contiguous ids (1), and its hint makes the id loads contiguous.
@triton.jit(do_not_specialize=["K", "stride_ids_n", "stride_out"])
def _logprobs_kernel(logits_ptr, ids_ptr, out_ptr, V, K, stride_row, stride_ids_n, stride_ids_k,
                     stride_out, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    # pass 1: per-lane online max / sum of exp over the row's chunks
    m_lane = tl.full([BLOCK], -float("inf"), tl.float32)
    s_lane = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m_lane, x)
        ref = tl.where(m_new == -float("inf"), 0.0, m_new)   # all -inf so far: avoid inf - inf
        s_lane = s_lane * tl.exp(m_lane - ref) + tl.exp(x - ref)
        m_lane = m_new
    m = tl.max(m_lane, axis=0)
    ref = tl.where(m == -float("inf"), 0.0, m)
    lse = ref + tl.log(tl.sum(s_lane * tl.exp(m_lane - ref), axis=0))
    # pass 2: the K gathers
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        ids = tl.load(ids_ptr + row * stride_ids_n + kk * stride_ids_k, mask=kmask, other=0)
        ok = (ids >= 0) & (ids < V)
        x = tl.load(base + tl.where(ok, ids, 0), mask=kmask & ok, other=float("nan")).to(tl.float32)
        tl.store(out_ptr + row * stride_out + kk, x - lse, mask=kmask)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
GATHER_BLOCK_K = 16
_TL = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _config(V: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of V logits.

    BLOCK = 4096 columns per chunk (V = 32016 -> 8 chunks, the last 82% full), fewer
    for small vocabularies; ~16 elements per thread (BLOCK // 256 threads = BLOCK // 512
    warps, 1..8): four 16-byte fp32 loads in flight per thread and, for the log-prob
    kernel, two fp32 per-lane accumulators of 16 registers each -- no spills (checked
    offline). One program per row: N is the batch (tens to hundreds of rows) and each
    row is only 128 KiB, so splitting a row over programs is not worth a second pass.
    Not measured on a GPU here.
    """
    block = min(4096, triton.next_power_of_2(V))
    num_warps = max(1, min(8, block // 512))
    return block, num_warps


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [N, V], got "
                         f"{tuple(getattr(logits, 'shape', ()))}")
    if logits.dtype not in _FLOATS:
        raise ValueError(f"logits must be fp32, fp16 or bf16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have V >= 1 columns")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have unit column stride, got strides {logits.stride()}")
    if logits.shape[1] >= 2 ** 31 - 4096:
        raise ValueError(f"logits: V={logits.shape[1]} is too large for int32 column indices")


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> [N] int64, the first maximal index (torch.argmax's rule;
    a NaN counts as the maximum, as in torch.argmax)."""
    _check_logits(logits)
    N, V = logits.shape
    out = torch.empty(N, dtype=torch.int64, device=logits.device)
    if N == 0:
        return out
    block, num_warps = _config(V)
    _argmax_kernel[(N,)](logits, out, V, logits.stride(0), BLOCK=block, num_warps=num_warps)
    return out


def gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits [N, V]) at token_ids [N, K] -> [N, K] fp32."""
    _check_logits(logits)
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        raise ValueError(f"token_ids must be a 2-D tensor [N, K], got "
                         f"{tuple(getattr(token_ids, 'shape', ()))}")
    if token_ids.dtype != torch.int64:
        raise ValueError(f"token_ids must be int64, got {token_ids.dtype}")
    N, V = logits.shape
    if token_ids.shape[0] != N:
        raise ValueError(f"token_ids has {token_ids.shape[0]} rows, logits {N}")
    if token_ids.device != logits.device:
        raise ValueError(f"token_ids is on {token_ids.device}, logits on {logits.device}")
    K = token_ids.shape[1]
    out = torch.empty((N, K), dtype=torch.float32, device=logits.device)
    if N == 0 or K == 0:
        return out
    block, num_warps = _config(V)
    # ids per gather step: fixed (one compiled variant whatever K is); K is 1 (the sampled
    # token) or a top-k of a few tens, so at most a few masked lanes are wasted
    block_k = GATHER_BLOCK_K
    _logprobs_kernel[(N,)](logits, token_ids, out, V, K, logits.stride(0), token_ids.stride(0),
                           token_ids.stride(1), out.stride(0), BLOCK=block, BLOCK_K=block_k,
                           num_warps=num_warps)
    return out


def compile_specs(shape: ModelShape) -> list[CompileSpec]:
    """The launchers' configurations for ``shape``: fp32 logits (what the engine's
    compute_logits returns; production), and logits in the activation dtype
    (accepted by the launchers, not used by the engine: production=False)."""
    block, num_warps = _config(shape.vocab_size)
    dtypes = ["*fp32"] + ([] if shape.dtype == "fp32" else [_TL[_TORCH[shape.dtype]]])
    specs = []
    for p in dtypes:
        prod = p == "*fp32"
        tag = "" if prod else f"[{p[1:]}]"
        specs.append(CompileSpec(
            _argmax_kernel, f"greedy_argmax{tag}",
            {"logits_ptr": p, "out_ptr": "*i64", "V": "i32", "stride_row": "i32",
             "BLOCK": "constexpr"}, {"BLOCK": block}, num_warps, 2, prod, exact=True))
        specs.append(CompileSpec(
            _logprobs_kernel, f"gather_logprobs{tag}",
            {"logits_ptr": p, "ids_ptr": "*i64", "out_ptr": "*fp32", "V": "i32", "K": "i32",
             "stride_row": "i32", "stride_ids_n": "i32", "stride_ids_k": "i32",
             "stride_out": "i32", "BLOCK": "constexpr", "BLOCK_K": "constexpr"},
            {"BLOCK": block, "BLOCK_K": GATHER_BLOCK_K}, num_warps, 2, prod))
    return specs
