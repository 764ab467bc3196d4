"""Pieces under the HTTP server, without a socket: ``EventStream``,
``watch_disconnect`` and ``AsyncEngine``'s prepare / commit / discard."""
import asyncio

import pytest

pytest.importorskip("starlette")

from engine import LLM, SamplingParams  # noqa: E402
from engine.server.async_engine import AsyncEngine, QueueFullError  # noqa: E402
from engine.server.streaming import ClientGone, EventStream, watch_disconnect  # noqa: E402
from selfrag.default_model import few_threads, random_model_dir  # noqa: E402


def run(coro):
    return asyncio.run(coro)


class Recorder:
    def __init__(self, fail_on=None):
        self.sent, self.fail_on = [], fail_on

    async def __call__(self, msg):
        if msg["type"] == self.fail_on:
            raise OSError("socket gone")
        self.sent.append(msg)


async def _never_receive():
    await asyncio.Event().wait()


def test_event_stream_sends_events_then_closes():
    closed = []

    async def events():
        yield "data: 1\n\n"
        yield "data: [DONE]\n\n"

    async def main():
        send = Recorder()
        await EventStream(events(), on_close=lambda: closed.append(1))({}, _never_receive, send)
        return send.sent

    sent = run(main())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b"data: [DONE]\n\n", b""]
    assert sent[-1]["more_body"] is False and closed == [1]


def test_event_stream_cleans_up_when_it_never_starts():
    """The send of the status line fails: the events are never iterated, yet the
    watcher is cancelled and on_close runs (so prepared requests are forgotten)."""
    closed, started = [], []

    async def events():
        started.append(1)
        yield "data: x\n\n"

    async def main():
        watcher = asyncio.ensure_future(_never_receive())
        with pytest.raises(OSError):
            await EventStream(events(), watcher, on_close=lambda: closed.append(1))(
                {}, _never_receive, Recorder(fail_on="http.response.start"))
        await asyncio.sleep(0)
        return watcher.cancelled()

    assert run(main()) and closed == [1] and started == []


def test_event_stream_client_gone_and_errors():
    async def gone():
        yield "data: 1\n\n"
        raise ClientGone()

    async def broken():
        yield "data: 1\n\n"
        raise RuntimeError("boom")

    async def main(events):
        send = Recorder()
        await EventStream(events)({}, _never_receive, send)
        return [m.get("body") for m in send.sent[1:]]

    assert run(main(gone())) == [b"data: 1\n\n"]            # no final frame: nobody listens
    bodies = run(main(broken()))
    assert bodies[0] == b"data: 1\n\n" and bodies[-1] == b""
    assert b'"type":"server_error"' in bodies[1] and b"boom" in bodies[1] and bodies[1].endswith(
        b"data: [DONE]\n\n")


def test_watch_disconnect_wakes_the_queue():
    async def main():
        msgs = asyncio.Queue()
        q = asyncio.Queue()
        watcher = watch_disconnect(msgs.get, q)
        await msgs.put({"type": "http.request", "body": b"", "more_body": False})
        await asyncio.sleep(0.01)
        assert q.empty()                                     # only a disconnect counts
        await msgs.put({"type": "http.disconnect"})
        item = await asyncio.wait_for(q.get(), 5)
        assert isinstance(item, ClientGone) and watcher.done()
        cancelled_q = asyncio.Queue()
        w2 = watch_disconnect(_never_receive, cancelled_q)
        w2.cancel()
        await asyncio.sleep(0)
        assert cancelled_q.empty()                           # a cancelled watcher says nothing

    run(main())


@pytest.fixture(scope="module")
def llm():
    with few_threads(1):
        yield LLM(random_model_dir(), dtype="float32", device="cpu", show_progress=False)


def test_prepare_commit_discard(llm):
    params = SamplingParams(temperature=0.0, max_tokens=3)

    async def main():
        eng = AsyncEngine(llm, max_waiting=2)
        eng.start()
        try:
            sub = eng.prepare(["one", "two"], params, "r")
            assert sub.rids == ["r-0", "r-1"] and eng.num_waiting == 2
            assert not llm.has_unfinished_requests()          # nothing queued yet
            with pytest.raises(QueueFullError):
                eng.prepare(["three"], params)
            eng.discard(sub)
            assert eng.num_waiting == 0 and sub.state == "discarded"
            with pytest.raises(RuntimeError, match="discarded"):
                eng.commit(sub)
            with pytest.raises(ValueError):                   # too long: refused before admission
                eng.prepare([{"prompt_token_ids": [5] * (llm.max_model_len + 1)}], params)
            assert eng.num_waiting == 0

            sub = eng.prepare(["one"], params, "s")
            eng.commit(sub)
            eng.discard(sub)                                  # no-op once queued
            outs = []
            while not (outs and outs[-1].finished):
                outs.extend(await asyncio.wait_for(sub.queue.get(), 30))
            with eng.lock:                                    # the stepping thread must not race
                ref = llm.generate("one", params, use_tqdm=False)[0]
            assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
            assert eng.num_waiting == 0 and eng.num_active == 0

            steps = eng.num_steps
            with eng.lock:                                    # as if a step were running
                sub = eng.prepare(["two"], params, "t")
                eng.commit(sub)                               # returns at once
                assert not llm.has_unfinished_requests()      # waits in the inbox
                eng.abort("t")
            for _ in range(100):
                if not eng._inbox:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert not eng._inbox and not llm.has_unfinished_requests()
            assert eng.num_steps == steps and eng.num_active == 0 and eng.num_waiting == 0
            assert sub.queue.empty()                          # it never reached the LLM
        finally:
            eng.stop()

    run(main())


def test_one_wakeup_per_step_for_many_requests(llm):
    """Four streams on one event loop: each step wakes that loop once, not four times,
    and every stream still gets exactly its own tokens (equal to a solo run)."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = ["one", "two two", "three three three", "four"]

    async def main():
        loop = asyncio.get_running_loop()
        calls = {"n": 0}
        real = loop.call_soon_threadsafe

        def counting(*a, **k):
            calls["n"] += 1
            return real(*a, **k)

        loop.call_soon_threadsafe = counting
        eng = AsyncEngine(llm)
        eng.start()
        try:
            steps0 = eng.num_steps
            subs = [eng.prepare([p], params) for p in prompts]
            for sub in subs:
                eng.commit(sub)

            async def collect(sub):
                outs = []
                while not (outs and outs[-1].finished):
                    outs.extend(await asyncio.wait_for(sub.queue.get(), 30))
                return outs[-1]

            finals = await asyncio.gather(*[collect(s) for s in subs])
            steps = eng.num_steps - steps0
        finally:
            eng.stop()
            loop.call_soon_threadsafe = real
        return finals, steps, calls["n"]

    finals, steps, wakeups = run(main())
    for p, out in zip(prompts, finals):
        assert out.outputs[0].token_ids == llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids
    assert wakeups <= steps < 4 * 6


@pytest.mark.parametrize("head,choice", [
    ({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"},
     {"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}),
    ({"id": 'q"\\', "object": "chat.completion.chunk", "created": 0, "model": "mod\u00e8le \u2603"},
     {"index": 3, "delta": {"content": "\n\u00e9\U0001f600"}, "finish_reason": "stop"}),
])
def test_sse_prefix_matches_whole_event(head, choice):
    from engine.server.streaming import compact_json, sse, sse_prefix
    event = sse_prefix(head) + compact_json(choice) + "]}\n\n"
    assert event == sse({**head, "choices": [choice]})
    import json
    assert json.loads(event[len("data: "):]) == {**head, "choices": [choice]}


def test_sync_proxy_cancel_unwinds_a_blocked_worker(llm):
    """``SyncLLMProxy.cancel`` from another thread: the worker's generate() raises
    the given reason within a step, its requests are aborted (blocks back), and the
    proxy refuses new requests; another proxy on the same engine is unaffected."""
    import threading
    import time

    from engine.server.async_engine import RequestCancelled

    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    eng = AsyncEngine(llm)
    eng.start()
    try:
        free = llm.block_manager.num_free_blocks
        proxy, caught = eng.sync_llm(), []

        def worker():
            try:
                proxy.generate(["a long one", "another long one"], long)
            except BaseException as e:          # noqa: BLE001 - recorded for the assert
                caught.append(e)

        t = threading.Thread(target=worker)
        t.start()
        t0 = time.monotonic()
        while eng.num_steps < 3 and time.monotonic() - t0 < 10:
            time.sleep(0.002)
        steps = eng.num_steps
        proxy.cancel()
        t.join(10)
        assert not t.is_alive() and len(caught) == 1 and isinstance(caught[0], RequestCancelled)
        assert eng.num_steps - steps < 50                    # 400 steps had it run on
        for _ in range(200):
            with eng.lock:
                if not llm.has_unfinished_requests() and llm.block_manager.num_free_blocks == free:
                    break
            time.sleep(0.01)
        with eng.lock:
            assert not llm.has_unfinished_requests() and llm.block_manager.num_free_blocks == free
        assert eng.num_active == 0 and not proxy.has_unfinished_requests()
        with pytest.raises(RequestCancelled):
            proxy.add_request("more", long)
        other = eng.sync_llm().generate("fine", SamplingParams(temperature=0.0, max_tokens=3))
        with eng.lock:                                        # the stepping thread must not race
            ref = llm.generate("fine", SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
        assert other[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    finally:
        eng.stop()
