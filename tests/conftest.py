"""Test-session setup: the one place that decides whether Triton interprets (and which
model commands without --model use).

Without CUDA, Triton kernels run in Triton's interpreter, which has to be
switched on before triton is first imported: this file is imported before any
test module. No test module may set TRITON_INTERPRET itself: on a GPU machine
that would turn every kernel into an interpreted function for the whole
session (collection imports all modules first). On CUDA the session refuses
to start unless every kernel is a compiled JITFunction.
"""
import os

# Commands without --model use the Self-RAG SmolLM2 (fetched from PyPI and built once);
# the suite pins the embedded miniature model, which is fast and always there, and sets it
# here so that subprocesses inherit it. tests/test_smollm2_model.py covers the default.
os.environ.setdefault("SELFRAG_DEFAULT_MODEL", "miniature")

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_sessionstart(session):
    import torch
    if not torch.cuda.is_available():
        return
    from kernels.triton.common import not_compiled
    bad = not_compiled()
    if bad:
        import pytest
        raise pytest.UsageError(
            f"CUDA is present but these Triton kernels are not compiled JITFunctions: {bad}. "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} switched Triton's "
            "interpreter on; unset it (tests/conftest.py decides on its own).")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_bm25: uses the bm25s package (absent on GPU machines)")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    import pytest
    if importlib.util.find_spec("bm25s") is None:
        skip = pytest.mark.skip(reason="bm25s is not installed (the GPU machines have no registry)")
        for item in items:
            if "needs_bm25" in item.keywords:
                item.add_marker(skip)


def pytest_runtest_setup(item):
    """In the GPU check (SELFRAG_TEST_DEVICE=cuda) the kernel tests build their
    tensors on the GPU, so the Triton kernels run compiled there."""
    if os.environ.get("SELFRAG_TEST_DEVICE") == "cuda" and item.module.__name__.split(".")[-1] in (
            "test_reference_ops", "test_triton_decode_attention", "test_triton_elementwise",
            "test_triton_prefill_attention"):
        import torch
        torch.set_default_device("cuda")


def pytest_runtest_teardown(item):
    if os.environ.get("SELFRAG_TEST_DEVICE") == "cuda":
        import torch
        torch.set_default_device("cpu")
