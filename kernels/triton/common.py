"""What every Triton kernel module shares: compile specs for the offline report,
and a look at the JIT's state (which kernels are compiled, how many variants).

Each kernel module exposes ``compile_specs(shape: ModelShape) -> list[CompileSpec]``:
the exact (signature, constexprs, num_warps, num_stages) configurations its
launcher picks for that model shape. ``python -m kernels.tools.report`` compiles each
for sm_80 and sm_90 without a GPU and reads registers / shared memory / spills.

JIT specialization: Triton compiles one variant per distinct key of a launch's
non-constexpr arguments: an int equal to 1 becomes a constant, a multiple of 16
gets a divisibility hint, a pointer gets one when 16-byte aligned. Every kernel
therefore lists in ``do_not_specialize`` the ints that change from one engine
step to the next (batch size, tile counts, table widths, ...), so the hot path
never compiles (~1 s each on a GPU); model constants (hidden sizes, weight and
cache strides) keep their hints. ``launch_kernels`` / ``compiled_variant_count``
let a GPU run prove it: the count must not grow after warm-up.
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
    # The oldest GPU architecture it is built for (None: every target). FP8 kernels say
    # 89: fp8 conversions do not exist below sm_89, so the report skips sm_80 for them.
    min_arch: int | None = None
    # Bit-exact against its reference (tests compare with torch.equal): the report fails a
    # compile whose PTX holds an approximate division (a plain `/` on fp32: use div_rn).
    exact: bool = False

    def config_str(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items()]
        return ",".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}"])


def triton_dtype(torch_dtype) -> str:
    """torch dtype -> Triton signature type of a pointer to it."""
    import torch
    return {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
            torch.int32: "*i32", torch.int64: "*i64"}[torch_dtype]


# ----------------------------------------------------------------------------- JIT state

def launch_kernels() -> list:
    """Every @triton.jit kernel a launcher in kernels/triton/ launches (not device
    helpers such as prefill's ``_attend_tile``): the kernels of the modules'
    ``compile_specs``, which by contract list every configuration a launcher picks."""
    import importlib
    import pkgutil

    import kernels.triton as pkg
    found = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name in ("common", "__init__"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        specs = getattr(mod, "compile_specs", None)
        for shape in (SHAPES if callable(specs) else ()):
            for spec in specs(shape):
                found.setdefault(id(spec.kernel), spec.kernel)
    return list(found.values())


def kernel_name(kernel) -> str:
    """The Python name of a @triton.jit kernel (JITFunction or InterpretedFunction)."""
    return getattr(getattr(kernel, "fn", None), "__name__", None) or repr(kernel)


def _is_compiled(kernel) -> bool:
    from triton.runtime.jit import JITFunction
    return isinstance(kernel, JITFunction)


def not_compiled(kernels=None) -> list[str]:
    """Names of the kernels (default: ``launch_kernels()``) that are not compiled
    JITFunctions, e.g. InterpretedFunctions under TRITON_INTERPRET=1."""
    return [kernel_name(k) for k in (launch_kernels() if kernels is None else kernels)
            if not _is_compiled(k)]


def compiled_variant_count(kernels=None) -> int:
    """Compiled variants cached so far over ``kernels`` (default: ``launch_kernels()``),
    all devices: the sum of len(kernel_cache) of ``fn.device_caches[device][0]`` (the
    layout of Triton 3.6 and 3.9). 0 for interpreted functions. A GPU run records it
    around each timed step: it must not grow once the engine is warm."""
    total = 0
    for k in (launch_kernels() if kernels is None else kernels):
        if _is_compiled(k):
            total += sum(len(caches[0]) for caches in list(k.device_caches.values()))
    return total


def _option_names(kernel, option: str) -> set[str]:
    """The argument names a jit option (a list of names or indices) refers to."""
    if hasattr(kernel, option):                       # JITFunction
        entries = getattr(kernel, option)
    else:                                             # InterpretedFunction keeps its kwargs
        entries = getattr(kernel, "kwargs", {}).get(option)
    names = kernel.arg_names
    return {names[e] if isinstance(e, int) else e for e in (entries or ())}


def no_specialize_names(kernel) -> set[str]:
    """The argument names in ``kernel``'s do_not_specialize."""
    return _option_names(kernel, "do_not_specialize")


def no_align_names(kernel) -> set[str]:
    """The argument names in ``kernel``'s do_not_specialize_on_alignment."""
    return _option_names(kernel, "do_not_specialize_on_alignment")
