"""Offline GPU gate: compile every Triton kernel configuration for sm_80 / sm_90
without a GPU and report registers, shared memory and register spills.

    python -m kernels.tools.report                 # production configs, sm_80 + sm_90
    python -m kernels.tools.report --all           # + the autotune space (production=False)
    python -m kernels.tools.report --targets 90 --kernel decode_attention --json out.json

Where the configurations come from: every module in ``kernels/triton/`` that
defines ``compile_specs(shape) -> list[CompileSpec]`` (see
``kernels/triton/common.py``), called for every shape in ``SHAPES``. Identical
(kernel, signature, constexprs, num_warps, num_stages) are compiled once; a spec with
``min_arch`` (the FP8 ones: 89) only for the targets at or above it. A
module that fails to import, or whose ``compile_specs`` raises, is a failed row,
not a crash. ``--module a.b`` (repeatable) replaces discovery (the tests use it).

How: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` --
the same frontend + ptxas as a launch on that GPU, minus the driver -- then the
triton wheel's own ``cuobjdump --dump-resource-usage`` on the cubin. Pointer
arguments get Triton's 16-byte-alignment specialisation (``tt.divisibility``),
as a launch with torch-allocated tensors would.

Reading cuobjdump (checked against ``ptxas -v``): per ``Function <name>:`` it
prints ``REG:n STACK:n SHARED:n LOCAL:n CONSTANT[0]:n ...``.
  * register spills show up as STACK (the per-thread stack frame: ptxas's
    "N bytes stack frame, M bytes spill stores"), NOT as LOCAL, which stays 0
    even for a heavily spilling kernel. Triton inlines every function and has no
    local arrays, so a non-zero STACK means spills. spill = STACK + LOCAL.
  * SHARED is only *static* shared memory: 0 for Triton kernels on sm_80 and
    1024 on sm_90 whenever the kernel touches shared memory at all (ptxas's
    reserved block; the PTX declares none). Triton allocates its buffers as
    dynamic shared memory: ``kernel.metadata.shared``, which is the smem column
    and what a launch checks against the device's per-block opt-in limit
    (OutOfResources); the report applies the same check per target, since the
    compile itself does not. The static bytes are in the JSON (static_smem).

A spec marked ``exact`` (its tests compare with ``torch.equal``) also fails when its
PTX holds an approximate division (``div.approx.f32``: what a plain fp32 ``/`` compiles
to; the interpreter divides exactly, so only the compile can show it).

Exit status: 0 only if nothing failed and nothing spilled; 1 otherwise; 2 for
a bad command line or a missing toolchain. The last line is always
``compiled N / failed F / spilling S``.

The secs column is the wall time of ``triton.compile`` in its worker: ~0 on a
hit in Triton's own cache (~/.triton/cache, keyed by kernel source, Triton
version and options); ``--fresh-cache`` compiles into an empty one.

Triton versions (the report must work on 3.6, which users run, and 3.9, the dev
venv): see ``make_ast_source`` for the constructor shim.

Must run with a real Triton frontend: with TRITON_INTERPRET set, ``@triton.jit``
yields interpreter functions that cannot be compiled, so ``python -m
kernels.tools.report`` re-executes itself without that variable (``main()`` called
in-process refuses instead).
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

DEFAULT_PACKAGE = "kernels.triton"
SKIP_MODULES = {"common", "__init__"}
DEFAULT_TARGETS = (80, 90)
# Per-block shared memory a kernel may request (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


# --------------------------------------------------------------------------------------
# cuobjdump
# --------------------------------------------------------------------------------------

_FUNC_RE = re.compile(r"^\s*Function\s+([^\s:]+)\s*:\s*$")
# Approximate fp32 division in PTX: what a plain `/` in a Triton kernel becomes on the GPU
# (div.approx.f32 under Triton 3.6 and 3.9; div.full.f32 and rcp.approx in other lowerings).
# The interpreter divides exactly, so a bit-exact test on CPU cannot see it.
APPROX_DIVISION_RE = re.compile(r"\b(div\.approx\.[a-z0-9.]+|div\.full\.[a-z0-9.]+|rcp\.approx\.[a-z0-9.]+)")


def approximate_divisions(ptx: str) -> list[str]:
    """The distinct approximate-division instructions in ``ptx``."""
    return sorted(set(APPROX_DIVISION_RE.findall(ptx)))
_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """Parse ``cuobjdump --dump-resource-usage`` output.

    Returns {function name: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}}
    for every ``Function <name>:`` block (the ``Common:`` block is ignored).
    Fields may be split over several lines; everything up to the next header
    belongs to the current function.
    """
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC_RE.match(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.endswith(":") and ":" not in stripped[:-1]:
            current = None              # "Common:", "Resource usage:", another header
            continue
        if current is not None:
            for key, val in _FIELD_RE.findall(stripped):
                current[key] = int(val)
    return out


def usage_of(usage: dict[str, dict[str, int]], name: str) -> dict[str, int]:
    """The entry for kernel ``name`` (Triton emits one entry function per cubin)."""
    if name in usage:
        return usage[name]
    if len(usage) == 1:
        return next(iter(usage.values()))
    if not usage:
        raise RuntimeError("cuobjdump reported no functions")
    raise RuntimeError(f"cuobjdump: no function {name!r} among {sorted(usage)}")


def spill_bytes(res: dict[str, int]) -> int:
    """Bytes of per-thread local memory: spills (STACK) + LOCAL. 0 for a clean kernel."""
    return int(res.get("STACK", 0)) + int(res.get("LOCAL", 0))


def nvidia_tool(name: str) -> str:
    """Path of a CUDA tool bundled in the triton wheel (triton/backends/nvidia/bin)."""
    import importlib.util
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("triton is not installed")
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "backends", "nvidia", "bin", name)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{name} not found in the triton wheel ({path})")
    return path


def toolchain_problem() -> str | None:
    """Why offline compilation cannot work here, or None if it can."""
    try:
        for tool in ("ptxas", "cuobjdump"):
            path = nvidia_tool(tool)
            r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                return f"{tool} --version failed: {r.stderr.strip()[:200]}"
        import importlib.util
        if importlib.util.find_spec("triton.backends.nvidia.compiler") is None:
            return "triton has no nvidia backend"
    except Exception as e:                      # noqa: BLE001 - any reason is a reason to skip
        return str(e)
    return None


# --------------------------------------------------------------------------------------
# Triton version shim
# --------------------------------------------------------------------------------------

def make_ast_source(fn, signature: dict, constexprs: dict, *, align_pointers: bool = True,
                    ast_source_cls=None):
    """Build a ``triton.compiler.ASTSource`` across Triton API generations.

    * Triton >= 3.2 (3.6 and 3.9 alike): ``ASTSource(fn, signature, constexprs=, attrs=)``;
      ``signature`` lists EVERY argument in order, constexprs typed ``"constexpr"``,
      their values in ``constexprs`` keyed by name; attrs keyed by argument-index
      path, e.g. ``{(0,): [["tt.divisibility", 16]]}``. A pointer gets it unless the
      kernel opts out (do_not_specialize or do_not_specialize_on_alignment), as a launch
      would; ints never do (the worst case for an int the JIT may specialize).
    * Triton 3.0/3.1: ``ASTSource(fn, signature, constants=, attrs=AttrsDescriptor)``;
      ``signature`` lists only the non-constexpr arguments, values in ``constants``
      (3.1: keyed by name; 3.0: by argument index). No alignment attrs there.
    The spec may list constexprs in its signature or not; both are accepted.
    """
    if ast_source_cls is None:
        from triton.compiler import ASTSource as ast_source_cls
    arg_names = list(fn.arg_names)
    sig = dict(signature)
    cx = dict(constexprs)
    unknown = [k for k in list(sig) + list(cx) if k not in arg_names]
    if unknown:
        raise ValueError(f"{fn.__name__}: signature/constexprs name unknown arguments {unknown}; "
                         f"the kernel takes {arg_names}")
    clash = [k for k in cx if k in sig and sig[k] != "constexpr"]
    if clash:
        raise ValueError(f"{fn.__name__}: {clash} given both a type and a constexpr value")
    typed_constexpr = [k for k, t in sig.items() if t == "constexpr" and k not in cx]
    if typed_constexpr:
        raise ValueError(f"{fn.__name__}: constexpr arguments {typed_constexpr} have no value in constexprs")
    missing = [a for a in arg_names if a not in sig and a not in cx]
    if missing:
        raise ValueError(f"{fn.__name__}: arguments {missing} missing from signature/constexprs")

    params = inspect.signature(ast_source_cls.__init__).parameters
    if "constexprs" in params:
        full = {a: ("constexpr" if a in cx else sig[a]) for a in arg_names}
        attrs = {}
        if align_pointers:
            from kernels.triton.common import no_align_names, no_specialize_names
            unhinted = no_specialize_names(fn) | no_align_names(fn)
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(arg_names)
                     if a not in cx and a not in unhinted and str(full[a]).startswith("*")}
        return ast_source_cls(fn=fn, signature=full, constexprs=cx, attrs=attrs)
    if "constants" in params:
        plain = {a: sig[a] for a in arg_names if a not in cx}
        try:
            return ast_source_cls(fn=fn, signature=plain, constants=cx)
        except TypeError:                      # Triton 3.0 wants argument indices
            idx = arg_names.index
            return ast_source_cls(fn=fn, signature={idx(a): t for a, t in plain.items()},
                                  constants={idx(a): v for a, v in cx.items()})
    raise RuntimeError(f"unsupported triton ASTSource signature: {list(params)}")


def make_target(arch: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", int(arch), 32)


def compile_options(spec) -> dict:
    # enable_fp_fusion: Triton 3.6 defaults to True; 3.9 also does but warns that 3.10
    # flips it. Pinned to what users on 3.6 get, and the warning goes away.
    return {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True}


# --------------------------------------------------------------------------------------
# Collecting specs
# --------------------------------------------------------------------------------------

@dataclass
class Job:
    module: str
    spec: object                          # CompileSpec
    shapes: list = field(default_factory=list)
    production: bool = True

    @property
    def fn_name(self) -> str:
        return getattr(getattr(self.spec.kernel, "fn", None), "__name__", None) or \
            getattr(self.spec.kernel, "__name__", repr(self.spec.kernel))


def _freeze(v):
    if isinstance(v, dict):
        return tuple((k, _freeze(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return repr(v)


def spec_key(spec) -> tuple:
    k = spec.kernel
    kid = (getattr(getattr(k, "fn", None), "__module__", None), getattr(getattr(k, "fn", None), "__qualname__", None))
    if kid == (None, None):
        kid = ("id", id(k))
    return (kid, _freeze(spec.signature), _freeze(spec.constexprs), spec.num_warps, spec.num_stages)


def discover_modules(package: str = DEFAULT_PACKAGE) -> list[str]:
    pkg = importlib.import_module(package)
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in SKIP_MODULES]
    return [f"{package}.{n}" for n in sorted(names)]


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _err_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def collect(modules: list[str], shapes, include_all: bool, kernel_filter: str | None):
    """-> (jobs, failure rows for modules that did not import / compile_specs that raised)."""
    jobs: dict[tuple, Job] = {}
    failures = []
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except BaseException as e:            # noqa: BLE001 - a broken module is a row
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append(_fail_row(mod_name, "<import>", f"import failed: {_err_text(e)}",
                                      traceback.format_exc()))
            continue
        fn = getattr(mod, "compile_specs", None)
        if not callable(fn):
            continue                          # a helper module, not a kernel
        for shape in shapes:
            try:
                specs = list(fn(shape))
            except Exception as e:            # noqa: BLE001
                failures.append(_fail_row(mod_name, "<compile_specs>",
                                          f"compile_specs({shape.name}) raised: {_err_text(e)}",
                                          traceback.format_exc(), shapes=[shape.name]))
                continue
            for spec in specs:
                try:
                    fn_name = Job(mod_name, spec).fn_name
                    if kernel_filter and not _matches(kernel_filter, mod_name, spec, fn_name):
                        continue
                    prod = bool(getattr(spec, "production", True))
                    if not prod and not include_all:
                        continue
                    key = spec_key(spec)
                except Exception as e:        # noqa: BLE001 - not a usable CompileSpec
                    failures.append(_fail_row(mod_name, "<compile_specs>",
                                              f"compile_specs({shape.name}) returned a bad spec "
                                              f"{spec!r:.120}: {_err_text(e)}", shapes=[shape.name]))
                    continue
                job = jobs.get(key)
                if job is None:
                    job = jobs[key] = Job(mod_name, spec, production=prod)
                else:
                    job.production = job.production or prod
                if shape.name not in job.shapes:
                    job.shapes.append(shape.name)
    return list(jobs.values()), failures


def _matches(pattern: str, module: str, spec, fn_name: str) -> bool:
    name = str(spec.name)
    cands = {_short(module), module, name, name.split("[", 1)[0], fn_name}
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    return any(fnmatch.fnmatchcase(c, p) for c in cands for p in pats)


def _fail_row(module, kernel, error, detail="", shapes=None):
    return {"module": module, "kernel": kernel, "function": "", "config": "", "dtypes": "",
            "target": "-", "shapes": shapes or [], "production": True, "status": "failed",
            "registers": None, "smem": None, "static_smem": None, "stack": None, "local": None,
            "spill_bytes": None, "compile_s": 0.0, "error": error, "detail": detail[-6000:]}


def _dtypes(signature: dict) -> str:
    seen = []
    for t in signature.values():
        t = str(t)
        if t.startswith("*") and t[1:] in ("fp16", "bf16", "fp32", "fp8e4nv", "fp8e5") and t[1:] not in seen:
            seen.append(t[1:])
    return "/".join(seen)


def _config(spec) -> str:
    try:
        return spec.config_str()
    except Exception:                         # noqa: BLE001 - any CompileSpec-like object
        parts = [f"{k}={v}" for k, v in dict(spec.constexprs).items()]
        return ",".join(parts + [f"w{spec.num_warps}", f"s{spec.num_stages}"])


# --------------------------------------------------------------------------------------
# Compiling (in worker processes)
# --------------------------------------------------------------------------------------

_JOBS: list = []            # (Job, arch), inherited by forked workers


def compile_one(job: Job, arch: int) -> dict:
    spec = job.spec
    row = {"module": job.module, "kernel": str(spec.name), "function": job.fn_name,
           "config": _config(spec), "dtypes": _dtypes(spec.signature), "target": f"sm_{arch}",
           "shapes": list(job.shapes), "production": job.production, "status": "ok",
           "registers": None, "smem": None, "static_smem": None, "stack": None, "local": None,
           "spill_bytes": None, "compile_s": 0.0, "error": "", "detail": ""}
    t0 = time.perf_counter()
    try:
        import triton
        src = make_ast_source(spec.kernel, spec.signature, spec.constexprs)
        k = triton.compile(src, target=make_target(arch), options=compile_options(spec))
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        cubin = k.asm["cubin"]
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(cubin)
            path = f.name
        try:
            r = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, timeout=120)
        finally:
            os.unlink(path)
        if r.returncode != 0:
            raise RuntimeError(f"cuobjdump failed: {r.stderr.strip()[:500]}")
        res = usage_of(parse_resource_usage(r.stdout), getattr(k.metadata, "name", spec.name))
        dyn = int(getattr(k.metadata, "shared", 0) or 0)
        row.update(registers=res.get("REG"), static_smem=res.get("SHARED", 0),
                   smem=dyn, stack=res.get("STACK", 0),
                   local=res.get("LOCAL", 0), spill_bytes=spill_bytes(res))
        limit = SMEM_LIMIT.get(arch)
        approx = approximate_divisions(k.asm.get("ptx", "")) if getattr(spec, "exact", False) else []
        if approx:
            row["status"] = "failed"
            row["error"] = (f"approximate division {approx} in a kernel that must be bit-exact against "
                            "its reference: use tl.math.div_rn")
        elif limit is not None and row["smem"] > limit:
            row["status"] = "failed"
            row["error"] = (f"shared memory {row['smem']} B > sm_{arch} per-block limit {limit} B "
                            f"(a launch raises OutOfResources)")
        elif row["spill_bytes"]:
            row["status"] = "spill"
    except Exception as e:                    # noqa: BLE001 - every failure is a row
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["status"] = "failed"
        row["error"] = _first_lines(_err_text(e), 3)
        row["detail"] = traceback.format_exc()[-6000:]
    return row


def _first_lines(text: str, n: int) -> str:
    """A one-line error: Triton's CompilationError puts the source excerpt first
    and the reason last, so keep the first line and the last ``n - 1``."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > n:
        lines = lines[:1] + ["..."] + lines[-(n - 1):]
    return " | ".join(lines)[:500]


def _run_index(i: int) -> dict:
    job, arch = _JOBS[i]
    return compile_one(job, arch)


def run_jobs(items: list, jobs: int, progress=None) -> list[dict]:
    """Compile (Job, arch) pairs; ``jobs`` > 1 uses forked worker processes."""
    global _JOBS
    _JOBS = items
    rows: list = [None] * len(items)
    if jobs <= 1 or len(items) <= 1 or not _can_fork():
        for i in range(len(items)):
            rows[i] = _run_index(i)
            if progress:
                progress(rows[i])
        return rows
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    ctx = mp.get_context("fork")
    todo = list(range(len(items)))
    while todo:
        broken = False
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
            futs = {i: pool.submit(_run_index, i) for i in todo}
            for i, fut in futs.items():
                try:
                    rows[i] = fut.result()
                    if progress:
                        progress(rows[i])
                except BrokenProcessPool:
                    broken = True
                    break
        if not broken:
            break
        # A worker died (e.g. a crash inside the compiler): find the culprit by
        # running what is left one per process, so one bad spec cannot hide the rest.
        todo = [i for i in todo if rows[i] is None]
        for i in todo:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                try:
                    rows[i] = pool.submit(_run_index, i).result()
                except BrokenProcessPool:
                    job, arch = items[i]
                    rows[i] = _fail_row(job.module, str(job.spec.name),
                                        "the compiler process died (crash inside triton/ptxas)")
                    rows[i].update(target=f"sm_{arch}", config=_config(job.spec),
                                   function=job.fn_name, dtypes=_dtypes(job.spec.signature),
                                   shapes=list(job.shapes), production=job.production)
            if progress:
                progress(rows[i])
        todo = []
    return rows


def _can_fork() -> bool:
    import multiprocessing as mp
    return "fork" in mp.get_all_start_methods()


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

COLUMNS = [("kernel", "kernel", "<"), ("dtypes", "dtype", "<"), ("config", "config", "<"),
           ("target", "target", "<"), ("registers", "regs", ">"), ("smem", "smem_B", ">"),
           ("spill_bytes", "spill_B", ">"), ("compile_s", "secs", ">"), ("status", "status", "<")]


def format_table(rows: list[dict]) -> str:
    def cell(r, key):
        v = r.get(key)
        if v is None:
            return "-"
        if key == "kernel" and not r.get("production", True):
            return f"{v} (autotune)"
        if key == "compile_s":
            return f"{v:.2f}"
        return str(v)
    cells = [[cell(r, k) for k, _, _ in COLUMNS] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(COLUMNS)]
    def fmt(vals):
        return "  ".join(v.ljust(w) if a == "<" else v.rjust(w)
                         for v, w, (_, _, a) in zip(vals, widths, COLUMNS)).rstrip()
    lines = [fmt([h for _, h, _ in COLUMNS]), fmt(["-" * w for w in widths])]
    lines += [fmt(c) for c in cells]
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict:
    return {"compiled": sum(r["status"] in ("ok", "spill") for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "spilling": sum(r["status"] == "spill" for r in rows)}


def summary_line(s: dict) -> str:
    return f"compiled {s['compiled']} / failed {s['failed']} / spilling {s['spilling']}"


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def _interpret_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() not in ("", "0", "false", "no", "off")


def _reexec_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["KERNELS_REPORT_REEXEC"] = "1"
    orig = getattr(sys, "orig_argv", None)     # python >= 3.10: the exact command line
    argv = [sys.executable] + list(orig[1:]) if orig else [sys.executable, "-m", "kernels.tools.report", *sys.argv[1:]]
    print("kernels.tools.report: TRITON_INTERPRET is set; re-running without it "
          "(the interpreter cannot compile to cubin)", file=sys.stderr, flush=True)
    os.execve(sys.executable, argv, env)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m kernels.tools.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="also the non-production specs (autotune space)")
    p.add_argument("--json", metavar="PATH", help="write the rows (and summary) as JSON")
    p.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                   help="comma-separated compute capabilities (default 80,90)")
    p.add_argument("--kernel", metavar="NAME",
                   help="only specs whose module, spec name (with or without [..]) or function "
                        "matches NAME (comma-separated, glob patterns allowed)")
    p.add_argument("--shape", metavar="NAME", help="only these SHAPES (comma-separated names)")
    p.add_argument("--module", action="append", metavar="DOTTED",
                   help="compile specs from this module instead of discovering kernels/triton/ (repeatable)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)")
    p.add_argument("--fresh-cache", action="store_true",
                   help="compile into an empty TRITON_CACHE_DIR so compile times are real")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    try:
        args.targets = [int(t.strip().lower().removeprefix("sm_").rstrip("a"))
                        for t in args.targets.split(",") if t.strip()]
    except ValueError:
        p.error(f"--targets: expected e.g. 80,90, got {args.targets!r}")
    if not args.targets:
        p.error("--targets: empty")
    return args


def main(argv=None) -> int:
    """Run the report in this process (``__main__`` re-executes first if TRITON_INTERPRET is set)."""
    if _interpret_on():
        print("kernels.tools.report: refusing to run with TRITON_INTERPRET set: interpreted kernels "
              "cannot be compiled; run `python -m kernels.tools.report` without it", file=sys.stderr)
        return 2
    args = parse_args(argv)
    if args.fresh_cache:
        import atexit
        import shutil
        fresh = tempfile.mkdtemp(prefix="kernels-report-cache-")
        atexit.register(shutil.rmtree, fresh, True)
        os.environ["TRITON_CACHE_DIR"] = fresh
    problem = toolchain_problem()
    if problem:
        print(f"kernels.tools.report: cannot compile offline: {problem}", file=sys.stderr)
        print(summary_line({"compiled": 0, "failed": 0, "spilling": 0}))
        return 2

    t_start = time.perf_counter()
    import triton

    from kernels.triton.common import SHAPES
    shapes = list(SHAPES)
    if args.shape:
        wanted = {s.strip() for s in args.shape.split(",")}
        shapes = [s for s in SHAPES if s.name in wanted]
        if not shapes:
            print(f"kernels.tools.report: no shape named {sorted(wanted)}; have {[s.name for s in SHAPES]}",
                  file=sys.stderr)
            return 2
    # Every shape in both activation dtypes the GPUs run: fp16 and bf16.
    shapes = [dataclasses.replace(s, dtype=dt) for s in shapes for dt in ("fp16", "bf16")]
    modules = args.module or discover_modules()
    jobs, failures = collect(modules, shapes, args.all, args.kernel)
    # a spec with min_arch (FP8) is compiled only for the targets that have its instructions
    items = [(job, arch) for job in jobs for arch in args.targets
             if getattr(job.spec, "min_arch", None) is None or arch >= job.spec.min_arch]
    print(f"triton {triton.__version__}: {len(jobs)} unique spec(s) from {len(modules)} module(s) "
          f"x {len(args.targets)} target(s), {len(shapes)} shape(s), {args.jobs} worker(s)",
          flush=True)

    done = [0]

    def progress(row):
        done[0] += 1
        if not args.quiet:
            print(f"  [{done[0]}/{len(items)}] {row['kernel']} {row['config']} {row['target']}: "
                  f"{row['status']} ({row['compile_s']:.1f}s)", file=sys.stderr, flush=True)

    rows = run_jobs(items, args.jobs, progress)
    rows.sort(key=lambda r: (r["module"], r["kernel"], r["dtypes"], r["config"], r["target"]))
    rows = failures + rows
    elapsed = time.perf_counter() - t_start

    print(format_table(rows) if rows else "(no kernel specs found)")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        print("\nproblems:")
        for r in bad:
            what = f"{r['kernel']} [{r['config']}] {r['target']}" if r["config"] else f"{r['module']} {r['kernel']}"
            msg = r["error"] or f"spills {r['spill_bytes']} B/thread (stack {r['stack']}, local {r['local']})"
            print(f"  {r['status'].upper()}: {_short(r['module'])}: {what} (shapes {','.join(r['shapes'])}): {msg}")
    summary = summarize(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton_version": triton.__version__, "targets": args.targets,
                       "elapsed_s": round(elapsed, 1), "summary": summary, "rows": rows}, f, indent=1)
    print(f"\n{len(items)} compile(s) in {elapsed:.1f}s")
    print(summary_line(summary))
    return 1 if (summary["failed"] or summary["spilling"]) else 0


if __name__ == "__main__":
    if _interpret_on() and not os.environ.get("KERNELS_REPORT_REEXEC"):
        _reexec_without_interpreter()          # does not return
    sys.exit(main())
