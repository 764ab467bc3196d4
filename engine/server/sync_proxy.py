"""``SyncLLMProxy``: an LLM-shaped object for blocking code (``SelfRAG``) in a worker thread,
over the shared ``AsyncEngine`` (``engine.sync_llm()``)."""
from __future__ import annotations

import itertools
import queue

from engine.server.errors import EngineDrainingError, RequestCancelled

_ids = itertools.count()


class SyncLLMProxy:
    """An LLM-shaped object for blocking code in a worker thread (``SelfRAG``):
    its ``add_request``/``step``/``abort``/``has_unfinished_requests`` (and ``fork``,
    ``extend``, ``release`` of held requests) go through the shared engine, so its requests
    batch with everyone else's and ``step()`` returns only this proxy's outputs. Not thread-safe itself: one
    per worker."""

    def __init__(self, engine):
        self._engine = engine
        self._llm = engine.llm
        self._q: queue.Queue = queue.Queue()
        self._mine: set[str] = set()
        self._cancelled: BaseException | None = None
        self.config = engine.llm.config
        self.tokenizer = engine.llm.tokenizer
        self.max_model_len = engine.llm.max_model_len

    def get_tokenizer(self):
        return self._llm.get_tokenizer()

    def add_request(self, prompt, params=None, request_id: str | None = None) -> str:
        eng = self._engine
        if self._cancelled is not None:
            raise self._cancelled
        if eng.draining:
            raise EngineDrainingError("the server is shutting down")
        rid = str(request_id) if request_id is not None else f"sync-{next(_ids)}"
        eng.submit([self._llm.prepare_request(prompt, params, rid)], self._q.put)
        self._mine.add(rid)
        return rid

    def step(self, timeout: float = 600.0):
        if self._cancelled is not None and self._mine:
            self._abort_mine()
            raise self._cancelled
        if not self._mine:
            return []
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no engine output in {timeout}s") from None
        if isinstance(item, BaseException):
            self._abort_mine()          # no-op after a failed step (all were aborted)
            raise item
        for out in item:
            if out.finished:
                self._mine.discard(out.request_id)
        return item

    def cancel(self, reason: BaseException | None = None) -> None:
        """Thread-safe (e.g. from the event loop when the HTTP client goes away): the
        worker's current or next ``step``, and any later ``add_request``, raise
        ``reason`` (default ``RequestCancelled``) after aborting this proxy's
        requests, so blocking code over this proxy unwinds within one step."""
        if self._cancelled is None:
            self._cancelled = reason if reason is not None else RequestCancelled("cancelled")
            self._q.put(self._cancelled)            # wakes a step() blocked on the queue

    def _abort_mine(self) -> None:
        mine, self._mine = self._mine, set()
        for rid in mine:
            self._engine.abort(rid)

    def abort(self, request_id: str) -> bool:
        rid = str(request_id)
        if rid in self._mine:
            self._mine.discard(rid)
            self._engine.abort(rid)
            return True
        return False

    def has_unfinished_requests(self) -> bool:
        return bool(self._mine)

    # The decoding primitives run under the engine's lock, between its steps; a request
    # that becomes active again (an extended one, a running request's fork) reports here.
    def _route(self, rid: str) -> None:
        self._engine.route(rid, self._q.put)
        self._mine.add(rid)

    def fork(self, request_id: str, n: int = 1, params=None) -> list[str]:
        if self._cancelled is not None:
            raise self._cancelled
        with self._engine.lock:
            kids = self._llm.fork(request_id, n, params)
            for rid in kids:
                if self._llm.is_running(rid):         # a running parent's children run too
                    self._route(rid)
        return kids

    def extend(self, request_id: str, token_ids, params=None, replace_last: bool = False) -> str:
        if self._cancelled is not None:
            raise self._cancelled
        with self._engine.lock:
            rid = self._llm.extend(request_id, token_ids, params, replace_last)
            self._route(rid)
        return rid

    def release(self, request_id: str) -> bool:
        with self._engine.lock:
            return self._llm.release(request_id)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False):
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        results = {}
        try:
            while len(results) < len(ids):
                if not self._mine:
                    raise RuntimeError("requests were aborted during generate()")
                for out in self.step():
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        return [results[i] for i in ids]
