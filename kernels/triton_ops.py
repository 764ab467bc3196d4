"""The Triton backend of the op layer: the launchers under the op names.

Importing this module imports Triton. On a machine without CUDA the kernels
can only run in Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` in the environment *before* Triton is first imported;
``kernels.ops.get_ops("triton", "cpu")`` checks that and says so.
"""
from __future__ import annotations

from kernels.reference import quantize_fp8  # elementwise torch ops, exact: no kernel needed
from kernels.triton.activation import silu_and_mul
from kernels.triton.decode_attention import decode_attention
from kernels.triton.gemv import gemv, silu_mul_gemv
from kernels.triton.norm import fused_add_rms_norm, rms_norm
from kernels.triton.prefill_attention import prefill_attention
from kernels.triton.rope_kv import rope_and_write_kv
from kernels.triton.sampling import gather_logprobs, greedy_argmax
from kernels.triton.w8a16 import quantize_int8, w8a16_linear

__all__ = ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope_and_write_kv",
           "prefill_attention", "decode_attention", "greedy_argmax", "gather_logprobs",
           "quantize_int8", "quantize_fp8", "w8a16_linear", "gemv", "silu_mul_gemv"]
