"""Weight-only int8 matrices (``LLM(..., quantization="int8")``).

A layer's four matrices (qkv, o, gate_up, down) are held as ``Int8Weight``: qweight
[N, K] int8 and scales [N] fp32, symmetric per output channel (the format is defined
by ``kernels.reference.quantize_int8``). The fp16/bf16 checkpoint is quantized as it
streams in, one HF tensor at a time, into rows of the (fused) int8 matrix, so the
full-precision model never exists on the device. Activations stay in the model dtype;
``ops.w8a16_linear`` does the matmuls.

The embedding and lm_head stay in the model dtype. The embedding is a gather of T rows
per step: int8 would save memory but no time. lm_head (32016 x 4096 on the 7B, 2% of
the fp16 weights, 4% of the 6.7 GB an int8 step streams) would save about 2% of a
batch-1 step; ``benchmarks/bench_int8_quality.py`` measures what it costs in accuracy
(the ``int8+lm_head`` row: top-1 agreement 99.65% instead of 99.81%), so it stays in
the model dtype (README, "int8 weights").
"""
from __future__ import annotations

import torch

QUANTIZATIONS = ("int8",)


def check_quantization(value) -> str | None:
    """``LLM(quantization=...)``: None or one we implement; else a ValueError naming it."""
    if value is None or value in QUANTIZATIONS:
        return value
    raise ValueError(f"LLM(quantization={value!r}) is not supported: use None (the checkpoint's "
                     f"own precision) or one of {QUANTIZATIONS} (weight-only, quantized at load "
                     "from the ordinary fp16/bf16 checkpoint)")


class Int8Weight:
    """W [N, K] ~= qweight [N, K] int8 * scales [N, 1] fp32."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        self.qweight, self.scales = qweight, scales

    @classmethod
    def empty(cls, N: int, K: int, device) -> "Int8Weight":
        return cls(torch.empty(N, K, dtype=torch.int8, device=device),
                   torch.empty(N, dtype=torch.float32, device=device))

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def rows(self, start: int, stop: int | None = None) -> "Int8Weight":
        """Rows [start, stop) as views (the q, k, v parts of qkv; gate and up)."""
        return Int8Weight(self.qweight[start:stop], self.scales[start:stop])

    def num_bytes(self) -> int:
        return self.qweight.numel() + 4 * self.scales.numel()

    def dequantize(self) -> torch.Tensor:
        """W in fp32 (tests, and the quality benchmark's comparisons)."""
        return self.qweight.float() * self.scales[:, None]
