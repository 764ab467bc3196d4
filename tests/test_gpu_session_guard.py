"""Only tests/conftest.py decides whether Triton interprets, and on CUDA a session
refuses to start with interpreted kernels. CUDA is simulated by a pytest plugin that
makes torch.cuda.is_available() return True before conftest is imported."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS_INTERPRET = re.compile(r"environ(\.setdefault\(|\[)\s*[\"']TRITON_INTERPRET[\"']")


def test_no_test_module_sets_triton_interpret():
    tests = os.path.join(REPO, "tests")
    offenders = [f for f in sorted(os.listdir(tests))
                 if f.endswith(".py") and f != "conftest.py"
                 and SETS_INTERPRET.search(open(os.path.join(tests, f)).read())]
    assert offenders == []


def _collect_with_fake_cuda(tmp_path, interpret: str | None):
    (tmp_path / "fake_cuda.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), REPO])
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "fake_cuda", "-p", "no:cacheprovider",
                           "--collect-only", "-q", "tests/test_decode_inputs.py"],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=300)


def test_cuda_session_refuses_interpreted_kernels(tmp_path):
    p = _collect_with_fake_cuda(tmp_path, "1")
    assert p.returncode != 0
    assert "not compiled JITFunctions" in p.stdout + p.stderr


def test_cuda_session_starts_with_compiled_kernels(tmp_path):
    """Without TRITON_INTERPRET conftest leaves the kernels compiled on 'CUDA'."""
    p = _collect_with_fake_cuda(tmp_path, None)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "test_one_copy_per_step" in p.stdout
