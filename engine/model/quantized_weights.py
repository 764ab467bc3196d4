"""Weight-only 8-bit matrices: ``LLM(..., quantization="int8")`` or ``"fp8"``.

A layer's four matrices (qkv, o, gate_up, down) are held as ``QuantizedWeight``: qweight
[N, K] (int8, or fp8 e4m3) and scales [N] fp32, symmetric per output channel (the
formats are defined by ``kernels.reference.quantize_int8`` / ``quantize_fp8``). The
fp16/bf16 checkpoint is quantized as it streams in, one HF tensor at a time, into rows
of the (fused) matrix, so the full-precision model never exists on the device.
Activations stay in the model dtype; ``ops.w8a16_linear`` does the matmuls for both.

int8 runs everywhere (sm_80 and newer on CUDA). fp8 keeps 3 mantissa bits with a
floating exponent (int8 keeps a fixed grid of 255 steps), needs an sm_89+ GPU for the
kernels' fp8 conversions, and runs on CPU through the reference.

The embedding and lm_head stay in the model dtype. The embedding is a gather of T rows
per step: 8-bit would save memory but no time. lm_head (32016 x 4096 on the 7B, 2% of
the fp16 weights, 4% of the 6.7 GB an int8 step streams) would save about 2% of a
batch-1 step; ``benchmarks/bench_int8_quality.py`` measures what it costs in accuracy
(the ``int8+lm_head`` row: top-1 agreement 99.65% instead of 99.81%), so it stays in
the model dtype (README, "8-bit weights").
"""
from __future__ import annotations

import torch

QUANTIZATIONS = ("int8", "fp8")
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def check_quantization(value) -> str | None:
    """``LLM(quantization=...)``: None or one we implement; else a ValueError naming it."""
    if value is None or value in QUANTIZATIONS:
        return value
    raise ValueError(f"LLM(quantization={value!r}) is not supported: use None (the checkpoint's "
                     f"own precision) or one of {QUANTIZATIONS} (weight-only, quantized at load "
                     "from the ordinary fp16/bf16 checkpoint)")


def check_device(quantization: str | None, device: torch.device) -> None:
    """fp8 weights on a GPU need sm_89+ (Ada, Hopper): say so before anything loads."""
    if quantization == "fp8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"LLM(quantization='fp8') needs a GPU of compute capability 8.9 or newer "
                             f"(Ada, Hopper) for its fp8 conversions; this one is {major}.{minor}: "
                             "use quantization='int8'")


class QuantizedWeight:
    """W [N, K] ~= qweight [N, K] (int8 or fp8 e4m3) * scales [N, 1] fp32."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        self.qweight, self.scales = qweight, scales

    @classmethod
    def empty(cls, N: int, K: int, device, quantization: str = "int8") -> "QuantizedWeight":
        return cls(torch.empty(N, K, dtype=STORAGE[quantization], device=device),
                   torch.empty(N, dtype=torch.float32, device=device))

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def format(self) -> str:
        return "fp8" if self.qweight.dtype == torch.float8_e4m3fn else "int8"

    def rows(self, start: int, stop: int | None = None) -> "QuantizedWeight":
        """Rows [start, stop) as views (the q, k, v parts of qkv; gate and up)."""
        return QuantizedWeight(self.qweight[start:stop], self.scales[start:stop])

    def num_bytes(self) -> int:
        return self.qweight.numel() + 4 * self.scales.numel()

    def dequantize(self) -> torch.Tensor:
        """W in fp32 (tests, and the quality benchmark's comparisons)."""
        return self.qweight.float() * self.scales[:, None]
