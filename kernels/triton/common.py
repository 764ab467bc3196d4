"""What every Triton kernel module shares: compile specs for the offline report.

Each kernel module exposes ``compile_specs(shape: ModelShape) -> list[CompileSpec]``:
the exact (signature, constexprs, num_warps, num_stages) configurations its
launcher picks for that model shape. ``python -m kernels.report`` compiles each
for sm_80 and sm_90 without a GPU and reads registers / shared memory / spills.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelShape:
    """The model dimensions a launcher's choices depend on."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    block_size: int = 16
    dtype: str = "fp16"          # "fp16", "bf16" or "fp32": the model's activation dtype


# The shapes the report and its test cover: the real models and the tests' small ones.
SHAPES = [
    ModelShape("selfrag-7b", 4096, 11008, 32, 32, 128, 32016),
    ModelShape("selfrag-13b", 5120, 13824, 40, 40, 128, 32016),
    ModelShape("gqa-32-8", 4096, 14336, 32, 8, 128, 32016),
    ModelShape("test-d16", 64, 160, 4, 2, 16, 320),
    ModelShape("test-d32", 128, 160, 4, 2, 32, 320),
    ModelShape("default-d64", 256, 688, 4, 2, 64, 1016),
]


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration to compile offline.

    signature: Triton type string per non-constexpr argument, in order
        (e.g. {"q_ptr": "*fp16", "stride_q": "i32", ...}).
    constexprs: values of the tl.constexpr arguments.
    """

    kernel: object                 # the @triton.jit function
    name: str                      # a readable name for the report, e.g. "decode_attention[split]"
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    production: bool = True        # False: only in `--all` (autotune space), not gated by the test

    def config_str(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items()]
        return ",".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}"])


def triton_dtype(torch_dtype) -> str:
    """torch dtype -> Triton signature type of a pointer to it."""
    import torch
    return {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
            torch.int32: "*i32", torch.int64: "*i64"}[torch_dtype]
