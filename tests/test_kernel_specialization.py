"""No JIT recompiles on the hot path: the kernels' do_not_specialize lists vs real launches.

Triton compiles one variant per distinct specialization key of a launch's non-constexpr
arguments (see kernels/triton/common.py): an int of 1 becomes a constant, a multiple of 16
gets a divisibility hint, a 16-byte-aligned pointer gets one too. So an argument whose key
changes between engine steps compiles a new variant mid-serving (~1 s on a GPU) unless the
kernel lists it in do_not_specialize (or, for a pointer, do_not_specialize_on_alignment).

The test records the arguments of every kernel launch while the real engine (Triton
backend, tiny random model) serves different batches: 1 prompt, then 4 prompts of
different lengths (one re-using a cached prefix; one asking for log-probs), then a
one-block prompt, each with decode steps at growing contexts; then an int8 engine loads and
serves 1 and 4 prompts. Direct launcher calls add
what a tiny CPU engine never varies (decode's num_splits and block-table width, a
misaligned slot view). Checked, per launch kernel:
  * every int argument whose key differs between launches is in do_not_specialize, and
    every pointer whose alignment differs is exempt from alignment specialization;
  * every listed name is a real non-constexpr argument that was seen to vary (the lists
    are exact: a model constant keeps its hint);
  * the checker itself reports an unlisted varying argument (a probe kernel).
Also the JIT-state helpers of kernels/triton/common.py.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from contextlib import contextmanager

import pytest
import torch
import triton
import triton.language as tl

import kernels.triton as kernel_pkg
from engine import SamplingParams
from kernels.metadata import AttentionMetadata
from kernels.triton import decode_attention, gemv, rope_kv, sampling, w8a16
from kernels.triton.common import (
    compiled_variant_count,
    kernel_name,
    launch_kernels,
    no_align_names,
    no_specialize_names,
    not_compiled,
)
from tests.helpers import DEVICE, make_checkpoint, make_llm

try:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
except ImportError:          # a Triton without it: the documented rule below
    native_specialize_impl = None

LAUNCH_KERNEL_NAMES = {
    "_decode_split_kernel", "_decode_reduce_kernel", "_prefill_attention_kernel",
    "_argmax_kernel", "_logprobs_kernel", "_rms_norm_kernel", "_fused_add_rms_norm_kernel",
    "_silu_and_mul_kernel", "_rope_write_kv_kernel", "_quantize_rows_kernel", "_w8a16_matmul_kernel",
    "_splitk_reduce_kernel", "_dequantize_kernel", "_gemv_kernel"}
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
        torch.int32: "*i32", torch.int64: "*i64"}


# ----------------------------------------------------------------------------- keys

def python_spec_key(value, specialize: bool = True, align: bool = True) -> tuple:
    """Triton 3.6 / 3.9's key for the argument kinds our launchers pass (runtime/jit.py,
    backends/compiler.py): bool -> u1 and float -> fp32, never specialized; int -> i32 /
    i64 / u64 by range, 1 -> the constant 1, else "D" when a multiple of 16, "" otherwise;
    tensor -> *dtype with "D" when its data_ptr is 16-byte aligned. Opted out: no attribute
    (None); align=False: never "D"."""
    if isinstance(value, bool):
        return ("u1", None)
    if isinstance(value, float):
        return ("fp32", None)
    if isinstance(value, int):
        ty = "i32" if -2**31 <= value < 2**31 else ("i64" if value < 2**63 else "u64")
        if not specialize:
            return (ty, None)
        if value == 1:
            return ("constexpr", 1)
        return (ty, "D" if align and value % 16 == 0 else "")
    if isinstance(value, torch.Tensor):
        ty = _PTR[value.dtype]
        if not specialize:
            return (ty, None)
        return (ty, "D" if align and value.data_ptr() % 16 == 0 else "")
    raise TypeError(f"no key rule for {type(value).__name__}")


def spec_key(value, specialize: bool = True, align: bool = True) -> tuple:
    """The key Triton's JIT computes for one argument (its own function when importable)."""
    if native_specialize_impl is None:
        return python_spec_key(value, specialize, align)
    return tuple(native_specialize_impl(BaseBackend, value, False, specialize, align))


# ----------------------------------------------------------------------------- recording

def _constexpr_names(kernel) -> set[str]:
    params = inspect.signature(kernel.fn).parameters
    return {n for n, p in params.items() if "constexpr" in str(p.annotation)}


@contextmanager
def recording(kernels, extra=None):
    """Wraps each kernel's ``run`` (what ``kernel[grid](...)`` calls) to record, per
    launch, {argument: (full specialization key, int value or None)} of its
    non-constexpr arguments. Yields {kernel name: [launch, ...]}."""
    launches = {kernel_name(k): [] for k in kernels}

    def wrap(kernel, run):
        names, constexprs = kernel.arg_names, _constexpr_names(kernel)

        def recorded_run(*args, grid, warmup, **kwargs):
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            launches[kernel_name(kernel)].append({
                n: (spec_key(v), v if isinstance(v, int) else None)
                for n, v in bound.items() if n not in constexprs})
            if extra is not None:
                extra(kernel, bound)
            return run(*args, grid=grid, warmup=warmup, **kwargs)
        return recorded_run

    for k in kernels:
        k.run = wrap(k, k.run)          # an instance attribute shadows the method
    try:
        yield launches
    finally:
        for k in kernels:
            del k.run


def varying(launches: list[dict]) -> dict[str, set]:
    """{argument: its keys} for every argument whose key changes between launches: the
    whole key for ints, the alignment attribute for pointers (a pointer's dtype only
    changes together with a constexpr, e.g. decode's DIRECT_OUT variant)."""
    out = {}
    for name in launches[0] if launches else ():
        keys = {launch[name][0] for launch in launches}
        if all(str(k[0]).startswith("*") for k in keys):
            if len({k[1] for k in keys}) > 1:
                out[name] = keys
        elif len(keys) > 1:
            out[name] = keys
    return out


def unlisted_varying(kernel, launches: list[dict]) -> list[str]:
    """Problems: arguments whose key varies but that the kernel still specializes."""
    dns, dna = no_specialize_names(kernel), no_align_names(kernel)
    problems = []
    for name, keys in sorted(varying(launches).items()):
        is_ptr = all(str(k[0]).startswith("*") for k in keys)
        if name in dns or (is_ptr and name in dna):
            continue
        values = sorted({launch[name][1] for launch in launches} - {None})
        what = "do_not_specialize" + ("(_on_alignment)" if is_ptr else "")
        problems.append(f"{kernel_name(kernel)}.{name}: keys {sorted(keys, key=str)}"
                        f"{f' (values {values})' if values else ''} vary between launches, "
                        f"not in {what}")
    return problems


def _all_jit_objects() -> list:
    """Every @triton.jit object at module level in kernels/triton/ (helpers included)."""
    found = {}
    for info in pkgutil.iter_modules(kernel_pkg.__path__):
        mod = importlib.import_module(f"{kernel_pkg.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, triton.runtime.KernelInterface):
                found[id(obj)] = obj
    return list(found.values())


# ----------------------------------------------------------------------------- the runs

def _decode_case(ctx: list[int], width: int, num_splits: int):
    """decode_attention on small paged caches with block tables ``width`` pages wide."""
    B, Hq, Hkv, D, bs = len(ctx), 4, 2, 16, 8
    g = torch.Generator(device=DEVICE).manual_seed(len(ctx) + width)
    nb = 1 + B * width
    kc = torch.randn(nb, bs, Hkv, D, generator=g, device=DEVICE)
    vc = torch.randn(nb, bs, Hkv, D, generator=g, device=DEVICE)
    bt = (1 + torch.arange(B * width, dtype=torch.int32, device=DEVICE)).view(B, width)
    meta = AttentionMetadata(False, torch.zeros(B, dtype=torch.int64, device=DEVICE), bt,
                             torch.tensor(ctx, dtype=torch.int32, device=DEVICE),
                             torch.arange(B + 1, dtype=torch.int32, device=DEVICE), 1, max(ctx))
    q = torch.randn(B, Hq, D, generator=g, device=DEVICE)
    decode_attention.decode_attention(q, kc, vc, meta, 0.25, num_splits=num_splits)


def _rope_case(slot_offset: int):
    """rope_and_write_kv with its slots a view ``slot_offset`` int64s into a buffer, as the
    engine's decode inputs slice them out of one packed staging buffer."""
    T, Hq, Hkv, D, bs = 2, 4, 2, 16, 8
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=DEVICE)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    cos = torch.randn(T, D, device=DEVICE)
    cache = torch.zeros(4, bs, Hkv, D, device=DEVICE)
    staged = torch.arange(8, dtype=torch.int64, device=DEVICE)
    rope_kv.rope_and_write_kv(q.reshape(T, Hq, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D),
                              cos, cos, cache, cache.clone(), staged[slot_offset:slot_offset + T])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(launches of every jit object, prefill (context_lens, query_start_loc) pairs)."""
    path = tmp_path_factory.mktemp("spec_ckpt")
    make_checkpoint(path, num_key_value_heads=2)
    # dtype "auto": the production dtype (fp16 on CUDA, whose prefill tiles are 64 rows;
    # fp32 on CPU, 16 rows), so the launches are those a served model makes.
    llm = make_llm(str(path), kernel_backend="triton", show_progress=False, max_model_len=128,
                   block_size=8, dtype="auto")
    prefills = []

    def extra(kernel, bound):
        if kernel_name(kernel) == "_prefill_attention_kernel":
            prefills.append((bound["context_lens_ptr"].tolist(),
                             bound["query_start_loc_ptr"].tolist()))

    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    wants_lp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=3,
                              logprob_token_ids=[5, 6])
    first = [1, 5, 9, 12, 33, 40, 41, 42, 43, 44, 45]            # 11 tokens: 2 pages
    batch = [first + [50, 51, 52, 53],                            # its first page is cached
             [1, 7, 8], list(range(3, 80)), [1, 100, 101, 102, 103]]    # 77: > 1 tile on CUDA
    with recording(_all_jit_objects(), extra) as launches:
        llm.generate([{"prompt_token_ids": first}], greedy, use_tqdm=False)
        llm.generate([{"prompt_token_ids": p} for p in batch],
                     [greedy, wants_lp, greedy, greedy], use_tqdm=False)
        llm.generate([{"prompt_token_ids": [1, 9, 4]}], greedy, use_tqdm=False)   # 1 page
        for ctx, width, ns in (([5], 1, 1), ([5], 1, 2), ([40, 7, 19], 5, 3),
                               ([300, 20, 0], 40, 16)):
            _decode_case(ctx, width, ns)
        for offset in (0, 1, 2):
            _rope_case(offset)
        # int8 weights: quantized at load, then decode at 1 and 4 rows and a 77-token
        # prefill (the split-K matmul kernel)
        q8 = make_llm(str(path), kernel_backend="triton", show_progress=False, max_model_len=128,
                      block_size=8, dtype="auto", quantization="int8")
        q8.generate([{"prompt_token_ids": first}], greedy, use_tqdm=False)
        q8.generate([{"prompt_token_ids": p} for p in batch], greedy, use_tqdm=False)
        # a prefill of more than 256 rows (dequantize, then the matmul): past this model's
        # max_model_len, so straight through the launcher
        layer = q8.model.layers[0]
        for rows in (300, 257):
            w8a16.w8a16_linear(torch.randn(rows, 64, device=DEVICE), layer.o.qweight, layer.o.scales)
        # the decode GEMV at the row counts a step changes (M is not specialized), 8-bit
        # and plain weights; the engine runs it only where the measured table says so
        for rows in (1, 5, 16):
            gemv.gemv(torch.randn(rows, 64, device=DEVICE), layer.o.qweight, layer.o.scales)
            gemv.gemv(torch.randn(rows, 64, device=DEVICE), torch.randn(64, 64, device=DEVICE))
    return launches, prefills


# ----------------------------------------------------------------------------- tests

def test_launches_vary_only_in_unspecialized_arguments(recorded):
    launches, prefills = recorded
    # the runs did what they are meant to: more than one batch shape, a cached prefix
    assert any(c[i] > q[i + 1] - q[i] for c, q in prefills for i in range(len(c))), prefills
    assert {len(c) for c, _ in prefills} >= {1, 4}
    problems = []
    for k in launch_kernels():
        assert len(launches[kernel_name(k)]) >= 2, f"{kernel_name(k)} launched < 2 times"
        problems += unlisted_varying(k, launches[kernel_name(k)])
    assert not problems, "\n".join(problems)


def test_lists_are_exact(recorded):
    """Each listed name is a real, non-constexpr argument (a misspelt name is silently
    ignored by Triton) that the runs saw varying: nothing loses its hint for nothing."""
    launches, _ = recorded
    for k in launch_kernels():
        listed = no_specialize_names(k) | no_align_names(k)
        assert listed <= set(k.arg_names) - _constexpr_names(k), kernel_name(k)
        assert listed <= set(varying(launches[kernel_name(k)])), \
            (kernel_name(k), listed - set(varying(launches[kernel_name(k)])))


def test_only_launch_kernels_are_launched(recorded):
    """launch_kernels() is complete: no other jit object of kernels/triton/ was launched."""
    launches, _ = recorded
    launched = {name for name, ls in launches.items() if ls}
    assert launched == {kernel_name(k) for k in launch_kernels()}


# a probe for the checker: a kernel whose varying int and pointer are not listed ...
@triton.jit
def _probe_kernel(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, x, mask=offs < n)


# ... and the same with both listed (n by index, as Triton also allows)
@triton.jit(do_not_specialize=[2], do_not_specialize_on_alignment=["x_ptr"])
def _probe_listed_kernel(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, x, mask=offs < n)


def test_checker_reports_unlisted_varying_arguments():
    x = torch.arange(40, dtype=torch.float32, device=DEVICE)
    out = torch.empty(16, device=DEVICE)
    probes = [_probe_kernel, _probe_listed_kernel]
    with recording(probes) as launches:
        for p in probes:
            p[(1,)](x, out, 1, 2, BLOCK=16)           # n = 1: the constant 1 when specialized
            p[(1,)](x[1:], out, 5, 2, BLOCK=16)       # n = 5, x 4 bytes off alignment
    assert torch.equal(out[:5], x[1:11:2])
    problems = unlisted_varying(_probe_kernel, launches["_probe_kernel"])
    assert len(problems) == 2, problems
    assert problems[0].startswith("_probe_kernel.n: ") and "values [1, 5]" in problems[0]
    assert problems[1].startswith("_probe_kernel.x_ptr: ")
    assert unlisted_varying(_probe_listed_kernel, launches["_probe_listed_kernel"]) == []
    assert no_specialize_names(_probe_listed_kernel) == {"n"}
    assert no_align_names(_probe_listed_kernel) == {"x_ptr"}
    assert no_specialize_names(_probe_kernel) == set() == no_align_names(_probe_kernel)


def test_python_key_rule_matches_triton():
    if native_specialize_impl is None:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    t = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    for v in (0, 1, 2, 15, 16, 17, 48, -1, -16, 2**31 - 1, 2**31, 2**40 + 16, True, 0.5,
              t, t[1:], t.float(), t.int()[1:]):
        for specialize in (True, False):
            for align in (True, False):
                assert python_spec_key(v, specialize, align) == spec_key(v, specialize, align), v


# ----------------------------------------------------------------------------- helpers

def test_launch_kernels_and_jit_state(recorded):
    kernels = launch_kernels()
    names = [kernel_name(k) for k in kernels]
    assert sorted(names) == sorted(LAUNCH_KERNEL_NAMES)       # no helper, no duplicate
    if DEVICE == "cuda":
        assert not_compiled() == []
        assert compiled_variant_count() > 0                   # the engine run compiled some
    else:       # the interpreter: nothing is compiled, nothing cached
        assert sorted(not_compiled()) == sorted(LAUNCH_KERNEL_NAMES)
        assert compiled_variant_count() == 0
    assert not_compiled([]) == [] and compiled_variant_count([]) == 0
    assert no_specialize_names(decode_attention._decode_split_kernel) == {"num_splits",
                                                                          "stride_btb"}
    assert no_specialize_names(sampling._logprobs_kernel) == {"K", "stride_ids_n",
                                                              "stride_out"}
    assert no_align_names(rope_kv._rope_write_kv_kernel) == {"slot_ptr"}
