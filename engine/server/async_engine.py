"""An asyncio front over ONE ``engine.LLM``.

A single background thread owns the stepping: it calls ``llm.step()`` while
requests are unfinished and hands each step's outputs to the requests'
sinks (per-request ``asyncio.Queue``s for coroutines, ``queue.Queue``s for
blocking callers such as Self-RAG). New requests are validated by the caller
(``LLM.prepare_request``) and put into an inbox that the thread moves into the
LLM at the next step boundary; aborts go the same way. Every call into the
LLM happens in that thread under ``self.lock``, so requests from all
connections share one continuously batched engine, nothing races with
``step()``, and adding never waits for a step to end.

    engine = AsyncEngine(llm); engine.start()
    async for out in engine.generate(prompt, params):   # cumulative RequestOutputs
        ...
    engine.sync_llm()   # an LLM-shaped proxy for blocking code (SelfRAG) in a worker thread
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from typing import AsyncIterator, Callable

from engine.errors import EngineDeadError  # noqa: F401 - re-exported: a failed step (HTTP 500)
from engine.server.errors import EngineDrainingError, QueueFullError, RequestCancelled  # noqa: F401 - re-exported

_ids = itertools.count()


class AsyncEngine:
    """One stepping thread over ``llm``; see the module docstring.

    max_waiting: most requests admitted but without a first output yet
        (None: unbounded); more raise ``QueueFullError``.
    """

    def __init__(self, llm, max_waiting: int | None = None, idle_wait_s: float = 0.5):
        self.llm = llm
        self.lock = threading.RLock()
        self.max_waiting = max_waiting
        self._idle_wait = idle_wait_s
        self._sinks: dict[str, Callable] = {}       # request id -> callable(list[out] | Exception)
        self._waiting: set[str] = set()             # admitted, no output yet
        self._aborts: list[str] = []
        self._inbox: collections.deque = collections.deque()   # (prepared requests, sink)
        self._work = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.draining = False
        self.error: BaseException | None = None
        self.num_steps = 0
        # Optional hooks called by the stepping thread: on_submit(request ids),
        # on_outputs(outputs), forget(request id) (the server's metrics).
        self.observer = None

    # ---- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop = True
        self._work.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def begin_drain(self) -> None:
        """New requests are refused (``EngineDrainingError``); running ones go on."""
        self.draining = True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_submitted(self) -> int:
        """Submissions handed over but not yet moved into the LLM (the next step takes them)."""
        return len(self._inbox)

    @property
    def num_active(self) -> int:
        return len(self._sinks)

    # ---- the stepping thread -----------------------------------------------------
    def _run(self) -> None:
        llm = self.llm
        while not self._stop:
            outs = None
            with self.lock:
                self._drain_inbox()                   # before aborts: an abort may name one of these
                if self._aborts:
                    aborts, self._aborts = self._aborts, []
                    for rid in aborts:
                        llm.abort(rid)
                busy = llm.has_unfinished_requests()
                if busy:
                    try:
                        outs = llm.step()
                        self.num_steps += 1
                    except BaseException as e:       # a broken step fails its requests, not the server
                        self._fail_all(e)
                        continue
            if busy:
                if outs:
                    self._dispatch(outs)
                continue
            self._work.wait(self._idle_wait)
            self._work.clear()

    def _drain_inbox(self) -> None:
        """Moves submitted requests into the LLM (stepping thread, lock held). One
        whose sink is gone was aborted, or failed by ``_fail_all``, before it got here."""
        while self._inbox:
            reqs, sink = self._inbox.popleft()
            added = []
            try:
                for req in reqs:
                    if self._sinks.get(req.request_id) is sink:
                        added.append(self.llm.enqueue_request(req))
            except BaseException as e:              # e.g. a request id already running
                for rid in added:
                    self.llm.abort(rid)
                for req in reqs:
                    self._sinks.pop(req.request_id, None)
                    self._waiting.discard(req.request_id)
                sink(e)

    def _dispatch(self, outs) -> None:
        if self.observer is not None:
            self.observer.on_outputs(outs)
        by_sink: dict[Callable, list] = {}
        for out in outs:
            rid = out.request_id
            sink = self._sinks.get(rid)
            if sink is None:
                continue
            self._waiting.discard(rid)
            if out.finished:
                self._sinks.pop(rid, None)
            by_sink.setdefault(sink, []).append(out)
        # One thread-safe wake-up per event loop per step, not one per request: each
        # call_soon_threadsafe is a self-pipe write (a syscall) and a GIL hand-off.
        by_loop: dict = {}
        for sink, group in by_sink.items():
            if isinstance(sink, _LoopSink):
                by_loop.setdefault(sink.loop, []).append((sink.put, group))
            else:
                sink(group)
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:            # that loop is closed: nobody is listening
                pass

    def _fail_all(self, exc: BaseException) -> None:
        """Called with the lock held after a failed step: aborts and fails every request."""
        sinks, self._sinks = self._sinks, {}
        self._waiting.clear()
        for rid in list(sinks):
            try:
                self.llm.abort(rid)
            except Exception:
                pass
        err = EngineDeadError(f"engine step failed: {type(exc).__name__}: {exc}")
        for sink in set(sinks.values()):
            sink(err)

    # ---- adding / aborting -------------------------------------------------------
    def _admit(self, n: int) -> None:
        if self.draining:
            raise EngineDrainingError("the server is shutting down")
        if self.max_waiting is not None and len(self._waiting) + n > self.max_waiting:
            raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_waiting="
                                 f"{self.max_waiting}); retry later")

    def submit(self, reqs, sink) -> None:
        """Registers the sinks, then hands the prepared requests to the stepping thread
        (never blocks: a step in progress is not waited for). ``sink(list[RequestOutput]
        | Exception)`` is called from the stepping thread."""
        for req in reqs:
            self._sinks[req.request_id] = sink
        if self.observer is not None:
            self.observer.on_submit([req.request_id for req in reqs])
        self._inbox.append((reqs, sink))
        self._work.set()

    def abort(self, request_id: str) -> None:
        """Aborts a request (non-blocking: the stepping thread frees its blocks
        before its next step, after queueing any still in the inbox)."""
        rid = str(request_id)
        if self.observer is not None:
            self.observer.forget(rid)
        if self._sinks.pop(rid, None) is not None:
            self._waiting.discard(rid)
            self._aborts.append(rid)
            self._work.set()

    # ---- asyncio API ---------------------------------------------------------------
    def prepare(self, prompts: list, params, request_id: str | None = None) -> "Submission":
        """Validates, tokenizes and admits prompts (one request each) without queueing
        them; ``commit`` queues them. A server answers errors raised here with an HTTP
        status, then sends its response headers, and only then commits: work the event
        loop does after waking the stepping thread holds the GIL the thread needs to
        start the prefill. Raises the LLM's ValueErrors, ``QueueFullError`` or
        ``EngineDrainingError``. Call ``discard`` if the submission is not committed."""
        self._admit(len(prompts))
        base = request_id or f"req-{next(_ids)}"
        rids = [base if len(prompts) == 1 else f"{base}-{i}" for i in range(len(prompts))]
        reqs = [self.llm.prepare_request(p, params, r) for p, r in zip(prompts, rids)]
        q: asyncio.Queue = asyncio.Queue()
        self._waiting.update(rids)
        return Submission(rids, reqs, q, _LoopSink(asyncio.get_running_loop(), q.put_nowait))

    def commit(self, sub: "Submission") -> None:
        """Queues a prepared submission and wakes the stepping thread (non-blocking);
        outputs then arrive on ``sub.queue`` as lists of cumulative ``RequestOutput``s
        (or an exception)."""
        if sub.state != "prepared":
            raise RuntimeError(f"submission {sub.rids[0]!r} is already {sub.state}")
        sub.state = "queued"
        self.submit(sub.reqs, sub.sink)

    def discard(self, sub: "Submission") -> None:
        """Forgets a prepared submission that will not be committed (no-op otherwise)."""
        if sub.state == "prepared":
            sub.state = "discarded"
            self._waiting.difference_update(sub.rids)

    async def add(self, prompts: list, params, request_id: str | None = None
                  ) -> tuple[list[str], asyncio.Queue]:
        """``prepare`` + ``commit``: queues prompts (one request each, all or nothing);
        returns their ids and the asyncio.Queue receiving their outputs."""
        sub = self.prepare(prompts, params, request_id)
        self.commit(sub)
        return sub.rids, sub.queue

    async def generate(self, prompt, params, request_id: str | None = None
                       ) -> AsyncIterator:
        """Yields the request's cumulative ``RequestOutput``s (the last is
        finished); aborts the request if the consumer stops early."""
        (rid,), q = await self.add([prompt], params, request_id)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                for out in item:
                    finished = out.finished
                    yield out
                    if finished:
                        return
        finally:
            if not finished:
                self.abort(rid)

    def route(self, request_id: str, sink) -> None:
        """Sends a request that became active again between steps (an extended held
        request, a running request's fork) to ``sink``; call with ``lock`` held."""
        self._sinks[str(request_id)] = sink
        self._work.set()

    # ---- blocking API (worker threads) -------------------------------------------
    def sync_llm(self):
        """An LLM-shaped proxy for blocking code in a worker thread (engine/server/sync_proxy.py)."""
        from engine.server.sync_proxy import SyncLLMProxy
        return SyncLLMProxy(self)


class _LoopSink:
    """Delivers to an asyncio queue from the stepping thread; ``_dispatch`` batches
    the deliveries of one step per event loop."""

    __slots__ = ("loop", "put")

    def __init__(self, loop, put):
        self.loop, self.put = loop, put

    def __call__(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.put, item)
        except RuntimeError:                # the loop is closed
            pass


def _deliver(deliveries) -> None:
    for put, group in deliveries:
        put(group)


class Submission:
    """Requests ``AsyncEngine.prepare`` validated and admitted; ``state`` is
    "prepared", then "queued" (``commit``) or "discarded" (``discard``)."""

    __slots__ = ("rids", "reqs", "queue", "sink", "state")

    def __init__(self, rids, reqs, queue, sink):
        self.rids, self.reqs, self.queue, self.sink = rids, reqs, queue, sink
        self.state = "prepared"
