"""Server-Sent Events and client-disconnect watching for the OpenAI routes.

``EventStream`` replaces Starlette's ``StreamingResponse`` for SSE. Under
uvicorn (ASGI spec 2.3) ``StreamingResponse`` runs the body in an anyio task
group beside a disconnect listener; here the listener is one plain asyncio
task (``watch_disconnect``) that wakes the handler through the request's own
output queue, with no task group or cancel scope on the per-request path.

``watch_disconnect(receive, q)`` serves non-streaming requests too: when the
client goes away it puts ``ClientGone`` into the request's output queue, the
waiting handler raises it, and the generator's cleanup aborts the engine
requests, freeing their KV blocks at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Callable

from starlette.responses import Response

log = logging.getLogger("engine.server")


class ClientGone(Exception):
    """The HTTP client closed the connection before its response was complete."""


async def until_disconnect(receive) -> None:
    """Returns once the client has disconnected."""
    # Call only after the request body was read: from then on uvicorn's receive()
    # blocks until the client disconnects or the response is complete.
    while (await receive())["type"] != "http.disconnect":
        pass


def watch_disconnect(receive, q: asyncio.Queue) -> asyncio.Task:
    """A task that puts ``ClientGone()`` into ``q`` once the client disconnects.
    Cancel it when the response is done (``EventStream`` does)."""
    task = asyncio.ensure_future(until_disconnect(receive))

    def done(t: asyncio.Task) -> None:
        if not t.cancelled():
            t.exception()                       # retrieved: no "never retrieved" warning
            q.put_nowait(ClientGone())
    task.add_done_callback(done)
    return task


# One encoder for every event: json.dumps(obj, separators=...) builds a new
# JSONEncoder per call, a visible share of a small chunk's cost.
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def sse(obj) -> str:
    """One SSE event carrying ``obj`` as compact JSON."""
    return f"data: {compact_json(obj)}\n\n"


def sse_prefix(obj: dict) -> str:
    """The start of every event of one response whose JSON is ``obj`` plus a last
    key ``"choices": [...]``: per token only the choice is encoded, as
    ``prefix + compact_json(choice) + "]}\\n\\n"``."""
    head = compact_json(obj)
    return f'data: {head[:-1]},"choices":['



class EventStream(Response):
    """A ``text/event-stream`` response over an async iterator of ``str`` events
    (see the module docstring). At the end ``watcher``, if given, is cancelled and
    ``on_close``, if given, is called.
    An exception from the iterator is logged and sent as an OpenAI-style
    ``data: {"error": ...}`` event followed by ``data: [DONE]`` (the status
    line has already gone out), as vLLM's server does."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], watcher: asyncio.Task | None = None,
                 on_close: Callable[[], None] | None = None, headers: dict | None = None):
        self.events, self.watcher, self.on_close = events, watcher, on_close
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope, receive, send) -> None:
        # The status line goes out at once, not with the first event: the client parses
        # it while the engine computes the prefill. Sending both together put that work
        # on the critical path (+0.3 ms p50 TTFT at one client on the CPU VM).
        started = False
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            started = True
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        except ClientGone:
            return                          # nobody is listening; the requests were aborted
        except Exception as e:
            if not started:
                raise
            log.exception("error while streaming")
            # An API error (e.g. one request failed) keeps its message, type and code.
            message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            await send({"type": "http.response.body", "more_body": True, "body": (sse({"error": {
                "message": message, "type": getattr(e, "type", "server_error"),
                "param": None, "code": getattr(e, "code", None)}}) + "data: [DONE]\n\n").encode()})
        finally:
            if self.watcher is not None:
                self.watcher.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()              # runs the generator's cleanup (aborts) now
            if self.on_close is not None:
                self.on_close()             # e.g. forget requests the stream never queued
        await send({"type": "http.response.body", "body": b"", "more_body": False})
