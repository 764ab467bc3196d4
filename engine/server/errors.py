"""The server's own failures, each an HTTP status (engine failures are engine.errors')."""
from __future__ import annotations


class QueueFullError(RuntimeError):
    """Too many requests wait for their first token (HTTP 429)."""


class EngineDrainingError(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class RequestCancelled(RuntimeError):
    """``SyncLLMProxy.cancel`` was called (e.g. the HTTP client went away)."""
