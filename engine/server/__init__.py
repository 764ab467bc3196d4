"""An OpenAI-compatible HTTP server over one ``engine.LLM`` (FastAPI + uvicorn).

    from engine.server import AsyncEngine            # no FastAPI needed
    from engine.server.app import create_app         # needs the ``serve`` extra

``AsyncEngine`` (asyncio front, one background stepping thread) imports with
the core dependencies only; ``create_app`` imports FastAPI lazily, so
``import engine`` never requires the ``serve`` extra.
"""
from engine.server.async_engine import AsyncEngine, EngineDrainingError, QueueFullError

__all__ = ["AsyncEngine", "EngineDrainingError", "QueueFullError", "create_app"]


def create_app(*args, **kwargs):
    """See ``engine.server.app.create_app`` (imports FastAPI on first use)."""
    from engine.server.app import create_app as _create_app
    return _create_app(*args, **kwargs)
