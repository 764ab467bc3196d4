"""The op layer: the one narrow interface between the model and its kernels.

Every hot op the model calls goes through an :class:`Ops` object picked by
backend. ``torch`` is the pure-PyTorch reference (``kernels.reference``),
which runs everywhere; the Triton kernels plug in behind the same names and
signatures. Matmuls of plain weights stay in cuBLAS/BLAS via torch, except the decode
GEMV (``gemv``, M <= 16 rows) where the GPU check measured it faster; those of 8-bit
weights are ops (``w8a16_linear``, and ``gemv`` at M <= 16).
"""
from __future__ import annotations

import functools
import os
import types

from kernels import reference
from kernels.reference import rope_cos_sin  # noqa: F401 - the RoPE tables every backend reads

OP_NAMES = (
    "rms_norm",            # (x [T,H], w [H], eps) -> [T,H]
    "fused_add_rms_norm",  # (x, residual, w, eps) -> (normed, new_residual)
    "silu_and_mul",        # (gate_up [T,2I]) -> [T,I]
    "rope_and_write_kv",   # (q, k, v, cos [T,D], sin [T,D], k_cache, v_cache, slot_mapping) -> None
    "prefill_attention",   # (q [T,Hq,D], k_cache, v_cache, meta, scale) -> [T,Hq,D]
    "decode_attention",    # (q [B,Hq,D], k_cache, v_cache, meta, scale) -> [B,Hq,D]
    "greedy_argmax",       # (logits [N,V]) -> [N]
    "gather_logprobs",     # (logits [N,V], ids [N,K]) -> [N,K]
    "quantize_int8",       # (w [N,K] float, qweight [N,K] int8 out, scales [N] fp32 out) -> None
    "quantize_fp8",        # (w [N,K] float, qweight [N,K] float8_e4m3fn out, scales [N] fp32 out) -> None
    "w8a16_linear",        # (x [M,K], qweight [N,K] int8 or fp8, scales [N] fp32) -> [M,N] in x's dtype
    "gemv",                # (x [M<=16,K], w [N,K] x's dtype or 8-bit, scales [N] fp32 | None) -> [M,N]
    "silu_mul_gemv",       # (gate_up [M<=16,2K], w [N,K], scales | None) -> gemv(silu_and_mul(gate_up), ...)
)

BACKENDS = ("auto", "torch", "triton")


class Ops(types.SimpleNamespace):
    """A namespace of op callables plus ``name``, the backend they come from."""


def _from_module(name: str, module) -> Ops:
    return Ops(name=name, **{op: getattr(module, op) for op in OP_NAMES})


def get_ops(backend: str = "auto", device_type: str = "cpu") -> Ops:
    """Returns the ops for ``backend`` on a device of type ``device_type``.

    ``auto``: the Triton kernels on CUDA, the PyTorch reference elsewhere.
    ``triton`` on CPU runs the kernels in Triton's interpreter, which needs
    ``TRITON_INTERPRET=1`` in the environment before Triton is imported.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device_type == "cuda" else "torch"
    if backend == "torch":
        return _from_module("torch", reference)
    if device_type != "cuda" and not _interpreter_on():
        raise ValueError(
            "kernel_backend='triton' on a machine without CUDA runs the kernels in Triton's "
            "interpreter: set TRITON_INTERPRET=1 in the environment before starting Python "
            "(it must be set before triton is imported), or use kernel_backend='torch'")
    from kernels import triton_ops
    return _from_module("triton", triton_ops)


GEMV_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemv_table.json")
GEMV_MAX_ROWS = 16          # kernels.triton.gemv.MAX_ROWS, without importing Triton


def gemv_max_rows(device_name: str, weights: str, N: int, K: int, table: str | None = None,
                  fusion: str | None = None) -> int:
    """Up to how many rows the decode GEMV (op ``gemv``) runs an [N, K] matrix of ``weights``
    ('fp16', 'bf16', 'int8', 'fp8') on GPU ``device_name``: the measured table's entry
    (``kernels/gemv_table.json``), 0 where it has none (cuBLAS, or w8a16 for 8-bit weights).
    ``fusion='silu_mul'``: the entry "silu_mul:NxK" for ``silu_mul_gemv`` (the activation as
    the down projection's prologue) against silu_and_mul then the unfused matmul.
    A lookup, never a timing: the same table gives the same choice on every start."""
    path = GEMV_TABLE if table is None else table
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    devices = _gemv_devices(path, st.st_mtime_ns, st.st_size)
    key = f"{N}x{K}" if fusion is None else f"{fusion}:{N}x{K}"
    rows = devices.get(device_name, {}).get(weights, {}).get(key, 0)
    if not isinstance(rows, int) or not 0 <= rows <= GEMV_MAX_ROWS:
        raise ValueError(f"{path}: devices[{device_name!r}][{weights!r}]['{key}'] must be an int in "
                         f"[0, {GEMV_MAX_ROWS}], got {rows!r}")
    return rows


@functools.lru_cache(maxsize=8)
def _gemv_devices(path: str, mtime_ns: int, size: int) -> dict:
    """The table's ``devices``, read once per version of the file (a model's start-up looks
    up six matrices)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if data.get("format") != 1 or not isinstance(data.get("devices"), dict):
        raise ValueError(f"{path}: expected format 1 with a 'devices' object")
    return data["devices"]


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, block_size: int, device) -> int:
    """The split count the Triton decode-attention launcher picks for ``batch`` sequences of
    up to ``max_context`` tokens on ``device`` (a CUDA graph fixes it per batch bucket)."""
    from kernels.triton.decode_attention import pick_num_splits, sm_count
    return pick_num_splits(batch, num_kv_heads, max_context, block_size, sm_count(device))


def _interpreter_on() -> bool:
    """True when Triton runs (or will run) its interpreter."""
    import os
    import sys
    flag = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    if "triton" in sys.modules and flag:
        try:   # the flag must have been set before triton was imported
            from triton import knobs
            return bool(knobs.runtime.interpret)
        except (ImportError, AttributeError):
            return True
    return flag
