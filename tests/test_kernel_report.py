"""The offline GPU gate (``python -m kernels.tools.report``) and its pieces.

* test_production_specs_compile_without_spills: the gate itself. Every production
  CompileSpec of every kernel module in kernels/triton/, for every SHAPE, must
  compile for sm_80 and sm_90 and must not spill registers. Runs the report in a
  subprocess without TRITON_INTERPRET (the interpreter cannot compile to cubin).
* The report on this file's own example kernels (this module doubles as a kernel
  module: it has ``compile_specs``): a clean vector add, a register-hungry kernel
  that must be reported as spilling, a kernel the compiler refuses, and a module
  that does not import -- all reported as rows, none crashing the report.
* The cuobjdump parser on captured text, the spill rule, and the ASTSource shim
  against the 3.0/3.1-style and >= 3.2-style constructors.

Skipped where the triton wheel has no nvidia backend / ptxas / cuobjdump.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from kernels.tools import report
from kernels.triton.common import CompileSpec

ROOT = Path(__file__).resolve().parents[1]
THIS_MODULE = "tests.test_kernel_report"

_problem = report.toolchain_problem()
needs_toolchain = pytest.mark.skipif(_problem is not None,
                                     reason=f"offline Triton compile unavailable: {_problem}")


# --------------------------------------------------------------------------------------
# Example kernels (compiled only by the report subprocess, never launched here)
# --------------------------------------------------------------------------------------

@triton.jit
def _example_vec_add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (x + y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _example_register_hungry(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # One warp holds BLOCK fp32 values (BLOCK / 32 per thread) live across a
    # reduction: with BLOCK=16384 that is 512 values per thread, 255 registers max.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    total = tl.sum(x, axis=0)
    tl.store(out_ptr + offs, x * total)


@triton.jit
def _example_refused(a_ptr, b_ptr, c_ptr, B: tl.constexpr):
    # tl.dot needs every operand dimension >= 16: the compiler refuses B=8.
    r = tl.arange(0, B)
    a = tl.load(a_ptr + r[:, None] * B + r[None, :])
    b = tl.load(b_ptr + r[:, None] * B + r[None, :])
    tl.store(c_ptr + r[:, None] * B + r[None, :], tl.dot(a, b))


@triton.jit
def _example_smem_hog(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # A software-pipelined matmul: num_stages copies of the A and B tiles live in
    # shared memory. 128x128x128 fp16 tiles (64 KiB per buffered stage) with
    # num_stages=6: Triton 3.6/3.9 allocate 192 KiB on sm_80 -- over the A100's
    # 163 KiB per block -- and 224 KiB on sm_90, under the H100's 227 KiB.
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def _example_division(x_ptr, out_ptr, BLOCK: tl.constexpr, ROUNDED: tl.constexpr):
    # fp32 x / 127: a plain `/` compiles to div.approx.f32, div_rn to IEEE division.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    if ROUNDED:
        y = tl.math.div_rn(x, tl.zeros([BLOCK], dtype=tl.float32) + 127.0)
    else:
        y = x / 127.0
    tl.store(out_ptr + offs, y)


def compile_specs(shape) -> list[CompileSpec]:
    """Same specs for every shape: the report must compile each once (dedupe)."""
    return [
        CompileSpec(_example_vec_add, "example_vec_add",
                    {"x_ptr": "*fp16", "y_ptr": "*fp16", "out_ptr": "*fp16", "n": "i32",
                     "BLOCK": "constexpr"},
                    {"BLOCK": 1024}, num_warps=4, num_stages=2),
        CompileSpec(_example_register_hungry, "example_register_hungry",
                    {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"},
                    {"BLOCK": 16384}, num_warps=1, num_stages=1, production=False),
        CompileSpec(_example_refused, "example_refused",
                    {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "B": "constexpr"},
                    {"B": 8}, num_warps=1, num_stages=1, production=False),
        CompileSpec(_example_smem_hog, "example_smem_hog",
                    {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32",
                     "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
                    {"BM": 128, "BN": 128, "BK": 128}, num_warps=8, num_stages=6, production=False),
        CompileSpec(_example_division, "example_exact_division",
                    {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr", "ROUNDED": "constexpr"},
                    {"BLOCK": 128, "ROUNDED": True}, num_warps=4, num_stages=1, production=False, exact=True),
        CompileSpec(_example_division, "example_inexact_division",
                    {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr", "ROUNDED": "constexpr"},
                    {"BLOCK": 128, "ROUNDED": False}, num_warps=4, num_stages=1, production=False, exact=True),
    ]


# --------------------------------------------------------------------------------------
# Running the report
# --------------------------------------------------------------------------------------

def run_report(*args, interpret: bool = False, timeout: int = 900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KERNELS_REPORT_REEXEC", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "kernels.tools.report", "-q", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@needs_toolchain
def test_production_specs_compile_without_spills(tmp_path):
    out = tmp_path / "report.json"
    r = run_report("--json", str(out))
    assert r.stdout.strip(), r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("compiled "), r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    bad = [f"{row['status']}: {row['module']} {row['kernel']} [{row['config']}] {row['target']} "
           f"shapes={row['shapes']}: {row['error'] or str(row['spill_bytes']) + ' B spilled'}"
           for row in data["rows"] if row["status"] != "ok"]
    assert not bad and r.returncode == 0, "offline GPU gate:\n" + "\n".join(bad) + "\n" + last
    targets = {row["target"] for row in data["rows"]}
    if data["rows"]:
        assert targets == {"sm_80", "sm_90"}


@needs_toolchain
def test_report_on_example_kernels_flags_spills_failures_and_broken_modules(tmp_path):
    out = tmp_path / "all.json"
    r = run_report("--all", "--module", THIS_MODULE, "--module", "tests._no_such_kernel_module",
                   "--json", str(out))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    by = {}
    for row in rows:
        by.setdefault(row["kernel"], []).append(row)

    # deduplicated across the 6 shapes: one row per target
    assert sorted(row["target"] for row in by["example_vec_add"]) == ["sm_80", "sm_90"]
    for row in by["example_vec_add"]:
        assert row["status"] == "ok" and row["spill_bytes"] == 0 and 0 < row["registers"] <= 64
        assert len(row["shapes"]) == len(report_shapes())
    for row in by["example_register_hungry"]:
        assert row["status"] == "spill", row
        assert row["spill_bytes"] > 0 and row["stack"] > 0 and not row["production"]
    assert len(by["example_register_hungry"]) == 2
    for row in by["example_refused"]:
        assert row["status"] == "failed" and row["error"], row
    assert len(by["example_refused"]) == 2
    hog = {row["target"]: row for row in by["example_smem_hog"]}
    assert hog["sm_80"]["status"] == "failed" and "shared memory" in hog["sm_80"]["error"]
    assert hog["sm_90"]["smem"] > report.SMEM_LIMIT[80] and hog["sm_90"]["status"] == "ok"
    (broken,) = by["<import>"]
    assert broken["status"] == "failed" and "_no_such_kernel_module" in broken["error"]
    # an `exact` kernel: IEEE division compiles clean, a plain `/` is refused
    assert [row["status"] for row in by["example_exact_division"]] == ["ok", "ok"]
    for row in by["example_inexact_division"]:
        assert row["status"] == "failed" and "div.approx.f32" in row["error"], row
    assert len(by["example_inexact_division"]) == 2

    last = r.stdout.strip().splitlines()[-1]
    assert last == "compiled 7 / failed 6 / spilling 2", r.stdout[-3000:]
    assert "SPILL: test_kernel_report: example_register_hungry" in r.stdout


@needs_toolchain
def test_report_production_only_passes_and_escapes_the_interpreter():
    # TRITON_INTERPRET=1 in the environment: the report must re-run itself without it.
    r = run_report("--module", THIS_MODULE, "--targets", "90", interpret=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "re-running without it" in r.stderr
    assert "example_register_hungry" not in r.stdout    # production only without --all
    assert r.stdout.strip().splitlines()[-1] == "compiled 1 / failed 0 / spilling 0"


def report_shapes():
    from kernels.triton.common import SHAPES
    return SHAPES


# --------------------------------------------------------------------------------------
# Unit tests: parser, spill rule, filters, shim
# --------------------------------------------------------------------------------------

# Captured from triton 3.9's cuobjdump on _example_register_hungry-like (BLOCK=16384, one
# warp) for sm_80, and a two-kernel cubin. ptxas -v on the same PTX said:
# "2896 bytes stack frame, 5632 bytes spill stores" -- spills are STACK, LOCAL stays 0.
SAMPLE_SPILL = """
Resource usage:
 Common:
  GLOBAL:0
 Function hungry:
  REG:64 STACK:2896 SHARED:0 LOCAL:0 CONSTANT[0]:384 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SAMPLE_MULTI = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0 CONSTANT[3]:16
 Function _attn_fwd:
  REG:168 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function helper_kernel:
  REG:10 STACK:0 SHARED:0 LOCAL:16 CONSTANT[0]:392
  TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage_spilling_sample():
    usage = report.parse_resource_usage(SAMPLE_SPILL)
    assert list(usage) == ["hungry"]
    res = usage["hungry"]
    assert (res["REG"], res["STACK"], res["SHARED"], res["LOCAL"]) == (64, 2896, 0, 0)
    assert res["CONSTANT[0]"] == 384
    assert report.spill_bytes(res) == 2896
    assert report.usage_of(usage, "whatever") is res      # single function: that one


def test_parse_resource_usage_multiple_functions_and_common_block():
    usage = report.parse_resource_usage(SAMPLE_MULTI)
    assert set(usage) == {"_attn_fwd", "helper_kernel"}   # "Common:" is not a function
    assert usage["_attn_fwd"]["REG"] == 168 and usage["_attn_fwd"]["SHARED"] == 1024
    assert report.spill_bytes(usage["_attn_fwd"]) == 0
    helper = usage["helper_kernel"]
    assert helper["LOCAL"] == 16 and helper["SAMPLER"] == 0      # continuation line
    assert report.spill_bytes(helper) == 16
    assert report.usage_of(usage, "_attn_fwd")["REG"] == 168
    with pytest.raises(RuntimeError):
        report.usage_of(usage, "missing")
    assert report.parse_resource_usage("") == {}


def test_summary_and_table():
    rows = [
        {"kernel": "a", "dtypes": "fp16", "config": "B=1,w4,s2", "target": "sm_80", "registers": 20,
         "smem": 0, "spill_bytes": 0, "compile_s": 0.5, "status": "ok", "production": True},
        {"kernel": "b", "dtypes": "bf16", "config": "B=2,w4,s2", "target": "sm_90", "registers": 255,
         "smem": 1024, "spill_bytes": 96, "compile_s": 1.25, "status": "spill", "production": False},
        {"kernel": "<import>", "dtypes": "", "config": "", "target": "-", "registers": None,
         "smem": None, "spill_bytes": None, "compile_s": 0.0, "status": "failed", "production": True},
    ]
    s = report.summarize(rows)
    assert report.summary_line(s) == "compiled 2 / failed 1 / spilling 1"
    table = report.format_table(rows).splitlines()
    assert table[0].split() == ["kernel", "dtype", "config", "target", "regs", "smem_B", "spill_B",
                                "secs", "status"]
    assert "b (autotune)" in table[3] and "1.25" in table[3]


def test_kernel_filter_and_dedupe():
    from kernels.triton.common import SHAPES
    jobs, failures = report.collect([THIS_MODULE], SHAPES, include_all=False, kernel_filter=None)
    assert not failures and [j.spec.name for j in jobs] == ["example_vec_add"]
    assert jobs[0].shapes == [s.name for s in SHAPES]
    jobs, _ = report.collect([THIS_MODULE], SHAPES[:1], include_all=True, kernel_filter="*hungry")
    assert [j.spec.name for j in jobs] == ["example_register_hungry"]
    jobs, _ = report.collect([THIS_MODULE], SHAPES[:1], include_all=True,
                             kernel_filter="test_kernel_report")          # module name
    assert len(jobs) == 6


class _FakeFn:
    __name__ = "k"
    arg_names = ["x_ptr", "n", "BLOCK"]


class _AstSourceNew:        # Triton >= 3.2 (3.6, 3.9)
    def __init__(self, fn, signature, constexprs=None, attrs=None):
        self.kw = dict(signature=signature, constexprs=constexprs, attrs=attrs)


class _AstSource31:         # Triton 3.1: names, no constexprs in the signature
    def __init__(self, fn, signature, constants=None, attrs=None):
        self.kw = dict(signature=signature, constants=constants)


class _AstSource30:         # Triton 3.0: argument indices
    def __init__(self, fn, signature, constants=None, attrs=None):
        if any(not isinstance(k, int) for k in signature):
            raise TypeError("Signature keys must be integers")
        self.kw = dict(signature=signature, constants=constants)


@pytest.mark.parametrize("sig", [{"x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"},
                                 {"x_ptr": "*fp16", "n": "i32"}])
def test_ast_source_shim(sig):
    cx = {"BLOCK": 128}
    new = report.make_ast_source(_FakeFn, sig, cx, ast_source_cls=_AstSourceNew).kw
    assert new["signature"] == {"x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}
    assert new["constexprs"] == {"BLOCK": 128}
    assert new["attrs"] == {(0,): [["tt.divisibility", 16]]}     # aligned pointers, as at launch
    old = report.make_ast_source(_FakeFn, sig, cx, ast_source_cls=_AstSource31).kw
    assert old == {"signature": {"x_ptr": "*fp16", "n": "i32"}, "constants": {"BLOCK": 128}}
    older = report.make_ast_source(_FakeFn, sig, cx, ast_source_cls=_AstSource30).kw
    assert older == {"signature": {0: "*fp16", 1: "i32"}, "constants": {2: 128}}


def test_ast_source_shim_rejects_bad_specs():
    with pytest.raises(ValueError, match="missing"):
        report.make_ast_source(_FakeFn, {"x_ptr": "*fp16"}, {"BLOCK": 1}, ast_source_cls=_AstSourceNew)
    with pytest.raises(ValueError, match="unknown"):
        report.make_ast_source(_FakeFn, {"x_ptr": "*fp16", "n": "i32", "m": "i32"}, {"BLOCK": 1},
                               ast_source_cls=_AstSourceNew)
    with pytest.raises(ValueError, match="no value"):
        report.make_ast_source(_FakeFn, {"x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}, {},
                               ast_source_cls=_AstSourceNew)
