"""The OpenAI-compatible HTTP server: a real uvicorn on 127.0.0.1 (random free
port) in a background thread, driven with httpx, over the embedded model."""
import asyncio
import json
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from engine import LLM, SamplingParams  # noqa: E402
from selfrag.default_model import few_threads, random_model_dir  # noqa: E402
from selfrag.prompts import render_chat  # noqa: E402

MODEL = "selfrag-test"
KEY = "sekret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        from selfrag.server import make_server
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, "127.0.0.1", self.port, graceful_timeout=10, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() - t0 < 20, "server did not start"
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)


def _llm():
    return LLM(random_model_dir(), dtype="float32", device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def threads():
    with few_threads(1):
        yield


@pytest.fixture(scope="module")
def llm(threads):
    return _llm()


@pytest.fixture(scope="module")
def app(llm):
    from engine.server.app import create_app
    from selfrag.server import selfrag_routes
    return create_app(llm, served_model_name=MODEL, rag=selfrag_routes(), max_body_bytes=64 * 1024,
                      max_tokens_cap=512, chat_prompt=render_chat)


@pytest.fixture(scope="module")
def server(app):
    s = Server(app)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def engine(app):
    return app.state.engine


def reference(llm, engine, prompt, **kw):
    """In-process greedy generation (under the engine lock: nothing races with the server)."""
    with engine.lock:
        assert not llm.has_unfinished_requests()
        return llm.generate(prompt, SamplingParams(temperature=0.0, **kw), use_tqdm=False)[0]


def sse_events(lines):
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_idle(engine, llm, free, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with engine.lock:
            if (engine.num_active == 0 and not llm.has_unfinished_requests()
                    and llm.block_manager.num_free_blocks == free):
                return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------- basic endpoints
def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == MODEL


def test_completion_equals_in_process(client, llm, engine):
    prompt = "What is an alpaca?"
    ref = reference(llm, engine, prompt, max_tokens=12, logprobs=2)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                             "temperature": 0, "user": "x", "logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    ch = body["choices"][0]
    assert ch["text"] == ref.outputs[0].text
    assert body["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)
    assert body["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    assert ch["finish_reason"] == ref.outputs[0].finish_reason
    assert len(ch["logprobs"]["token_logprobs"]) == len(ref.outputs[0].token_ids)
    assert ch["logprobs"]["token_logprobs"][0] == pytest.approx(
        ref.outputs[0].logprobs[0][ref.outputs[0].token_ids[0]].logprob, abs=1e-4)


def test_completion_prompt_forms(client, llm, engine):
    ids = llm.get_tokenizer().encode("Tell me about llamas")
    ref = reference(llm, engine, {"prompt_token_ids": ids}, max_tokens=6)
    for prompt, n in ((ids, 1), ([ids, ids], 2), (["Tell me about llamas", "Hi"], 2)):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == list(range(n))
        assert choices[0]["text"] == ref.outputs[0].text


def test_completion_stream_equals_non_stream(client):
    req = {"prompt": "Where do llamas live?", "max_tokens": 10, "temperature": 0, "seed": 3}
    full = client.post("/v1/completions", json=req).json()
    with client.stream("POST", "/v1/completions",
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_and_sampling_seed(client):
    req = {"prompt": "Hello", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 7}
    a = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert a == b
    ref = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0})
    text = ref.json()["choices"][0]["text"]
    if len(text) > 3:
        stop = text[2:4]
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0,
                                                 "stop": [stop]}).json()["choices"][0]
        assert r["finish_reason"] == "stop" and stop not in r["text"]


def test_chat_completion(client, llm, engine):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is an alpaca?"}]
    # every message reaches the model (the system text too), in Self-RAG's format
    ref = reference(llm, engine, "### Instruction:\nbe brief\n\nWhat is an alpaca?\n\n### Response:\n",
                    max_tokens=9)
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 9,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.outputs[0].text}
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": msgs, "max_tokens": 9, "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 9
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == ref.outputs[0].text


def test_selfrag_answer(client):
    r = client.post("/v1/selfrag/answer", json={
        "question": "What is an alpaca?", "mode": "always", "k": 2, "max_tokens": 8,
        "passages": [{"title": "Alpaca", "text": "The alpaca is a camelid."},
                     {"title": "Llama", "text": "The llama is larger."}]})
    assert r.status_code == 200, r.text
    d = r.json()
    assert set(d) >= {"answer", "retrieved", "retrieval_prob", "candidates", "tree"}
    assert d["retrieved"] is True and len(d["candidates"]) == 2
    r = client.post("/v1/selfrag/answer", json={"question": "Why?", "max_tokens": 4, "long": True,
                                                "max_depth": 1, "k": 1,
                                                "passages": [{"title": "T", "text": "Because."}]})
    assert r.status_code == 200, r.text
    assert r.json()["tree"]
    r = client.post("/v1/selfrag/answer", json={"question": "Why?", "mode": "sometimes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"


@pytest.mark.needs_bm25
def test_selfrag_answer_default_retriever(client):
    r = client.post("/v1/selfrag/answer", json={"question": "What do alpacas eat?", "mode": "always",
                                                "k": 2, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert len(r.json()["candidates"]) == 2


# ---------------------------------------------------------------- errors and limits
def _err(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_openapi_lists_every_route(client):
    spec = client.get("/openapi.json").json()
    for path, model in (("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/selfrag/answer", None)):
        assert "post" in spec["paths"][path], path
        if model is not None:
            ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{model}"
            assert "prompt" in spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "ChatMessage" in spec["components"]["schemas"]          # nested models resolve
    assert client.get("/openapi.json").json() == spec               # stable across calls


def test_bad_requests(client, llm, engine):
    h = {"content-type": "application/json"}
    assert _err(client.post("/v1/completions", content="{not json", headers=h), 400)["code"] == "json_invalid"
    _err(client.post("/v1/completions", json={"prompt": 5}), 400)
    assert _err(client.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400)[
        "param"] == "max_tokens"
    _err(client.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400)
    _err(client.post("/v1/completions", json={"prompt": "x", "n": 0}), 400)
    _err(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400)   # 0 needs echo
    _err(client.post("/v1/completions", json={"prompt": ""}), 400)
    _err(client.post("/v1/completions", json={"prompt": [llm.config.vocab_size + 5]}), 400)
    _err(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 100000}), 400)
    _err(client.post("/v1/chat/completions", json={"messages": []}), 400)
    _err(client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]}), 400)
    long_ids = [5] * (llm.max_model_len + 1)
    assert "max_model_len" in _err(client.post("/v1/completions", json={"prompt": long_ids}), 400)["message"]
    assert _err(client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404)[
        "code"] == "model_not_found"
    _err(client.get("/v1/nothing"), 404)
    _err(client.get("/v1/completions"), 405)
    assert engine.num_waiting == 0 and engine.num_active == 0      # refused requests left nothing


def test_huge_bodies(client):
    big = {"prompt": "x" * (100 * 1024)}
    assert client.post("/v1/completions", json=big).status_code == 413

    def chunks():
        for _ in range(100):
            yield b"x" * 1024
    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code in (400, 413)
    assert client.get("/health").status_code == 200


def test_api_key(llm, engine):
    from engine.server.app import create_app
    s = Server(create_app(llm, served_model_name=MODEL, api_key=KEY, engine=engine))
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert _err(c.get("/v1/models"), 401)["type"] == "authentication_error"
            _err(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
            _err(c.post("/v1/completions", json={"prompt": "x"}), 401)
            ok = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                        headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200
    finally:
        s.close()
    assert engine._thread is not None and engine._thread.is_alive()   # the shared engine lives on


def test_queue_full_429(client, engine, server):
    engine.max_waiting = 1
    results = {}
    try:
        with engine.lock:       # the engine cannot admit: the first request waits
            t = threading.Thread(target=lambda: results.setdefault(
                "first", httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2},
                                    timeout=30)))
            t.start()
            t0 = time.monotonic()
            while engine.num_waiting < 1 and time.monotonic() - t0 < 10:
                time.sleep(0.005)
            r = client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
            assert _err(r, 429)["type"] == "rate_limit_error"
            assert r.headers["Retry-After"]
        t.join(30)
        assert results["first"].status_code == 200
    finally:
        engine.max_waiting = 1024


# ---------------------------------------------------------------- concurrency
PROMPTS = [f"Question {i}: what is {w}?" for i, w in enumerate(
    ["an alpaca", "a llama", "a camel", "a vicuna", "a guanaco", "wool", "the Andes", "Peru"] * 8)]


async def _stream_one(ac, prompt, max_tokens):
    text, finish = [], None
    async with ac.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])["choices"][0]
            text.append(ch["text"])
            finish = ch["finish_reason"] or finish
    return "".join(text), finish


def test_64_concurrent_streams(server, llm, engine):
    solo = [reference(llm, engine, p, max_tokens=12).outputs[0].text for p in PROMPTS]

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as ac:
            return await asyncio.gather(*[_stream_one(ac, p, 12) for p in PROMPTS])

    steps0 = engine.num_steps
    out = asyncio.run(main())
    assert [t for t, _ in out] == solo
    assert all(f == "length" for _, f in out)
    assert engine.num_steps - steps0 < 64 * 12 / 2     # they were batched together


def test_disconnects_free_blocks(server, llm, engine):
    assert wait_idle(engine, llm, llm.block_manager.num_free_blocks)
    with engine.lock:
        free = llm.block_manager.num_free_blocks

    async def drop(ac, i):
        async with ac.stream("POST", "/v1/completions", json={
                "prompt": f"A long story number {i}:", "max_tokens": 400, "temperature": 0,
                "stream": True}) as r:
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if n >= 3:
                        break          # leaves the context: the connection closes mid-stream

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=32)) as ac:
            await asyncio.gather(*[drop(ac, i) for i in range(16)])

    asyncio.run(main())
    assert wait_idle(engine, llm, free), (engine.num_active, llm.block_manager.num_free_blocks, free)


def _post_then_hang_up(server, llm, engine, path, body):
    """POSTs ``body`` on a raw socket, closes it once the engine has run 3 steps for
    it, and checks its blocks come back; returns the steps it ran in all."""
    assert wait_idle(engine, llm, llm.block_manager.num_free_blocks)
    with engine.lock:
        free = llm.block_manager.num_free_blocks
    steps0 = engine.num_steps
    body = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        t0 = time.monotonic()
        while engine.num_steps - steps0 < 3 and time.monotonic() - t0 < 10:
            time.sleep(0.002)
        assert engine.num_active >= 1
    assert wait_idle(engine, llm, free), (engine.num_active, llm.block_manager.num_free_blocks, free)
    return engine.num_steps - steps0


def test_non_streaming_disconnect_aborts(server, llm, engine):
    """A non-streaming client that hangs up is aborted at once, not run to max_tokens."""
    steps = _post_then_hang_up(server, llm, engine, "/v1/completions", {
        "prompt": "A very long story:", "max_tokens": 500, "temperature": 0, "ignore_eos": True})
    assert steps < 250                              # 500 steps had it run to the end


def test_selfrag_answer_disconnect_aborts(server, llm, engine, client):
    """A /v1/selfrag/answer client that hangs up cancels the pipeline's worker: its
    branches are aborted within a step or two instead of running to max_tokens (this
    unconstrained answer runs 500 steps uninterrupted), and the server serves on."""
    steps = _post_then_hang_up(server, llm, engine, "/v1/selfrag/answer", {
        "question": "Tell me a long story about alpacas.", "mode": "always", "k": 2,
        "max_tokens": 500, "constrained": False,
        "passages": [{"title": "Alpaca", "text": "The alpaca is a camelid."},
                     {"title": "Llama", "text": "The llama is larger."}]})
    assert steps < 250
    r = client.post("/v1/selfrag/answer", json={"question": "Why?", "mode": "never", "max_tokens": 4})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("hold_loop", [False, True])
def test_engine_failure_mid_stream_and_before_response(threads, hold_loop):
    """A failing step: a stream already under way ends with its tokens, then an
    OpenAI-style error event and [DONE]; a non-streaming request gets a 500 in the
    error shape; the server then serves again. ``hold_loop`` keeps the server's event
    loop busy while steps 2..4 run, so the tokens and the failure reach the request's
    queue together (CI hit that race: the error used to go out without the tokens)."""
    from engine.server.app import create_app
    llm = _llm()
    app = create_app(llm, served_model_name=MODEL)
    engine, real_step, calls = app.state.engine, llm.step, {"n": 0, "fail_at": 4}

    def step():
        calls["n"] += 1
        if hold_loop and calls["n"] == 1 and calls["fail_at"] == 4:
            loop = next(iter(engine._sinks.values())).loop
            loop.call_soon_threadsafe(time.sleep, 0.5)
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("injected failure")
        return real_step()

    llm.step = step
    s = Server(app)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "Go on", "max_tokens": 40,
                                                           "temperature": 0, "stream": True}) as r:
                assert r.status_code == 200
                events = sse_events(r.iter_lines())
            assert events[-1] == "[DONE]"
            assert events[-2]["error"]["type"] == "server_error"
            assert "injected failure" in events[-2]["error"]["message"]
            text = "".join(e["choices"][0]["text"] for e in events[:-2])
            ref = _llm().generate(["Go on"], SamplingParams(temperature=0, max_tokens=3),
                                  use_tqdm=False)[0].outputs[0].text
            assert text == ref                                # the three good steps' tokens
            calls["n"], calls["fail_at"] = 0, 2
            r = c.post("/v1/completions", json={"prompt": "Go on", "max_tokens": 40})
            err = _err(r, 500)
            assert err["type"] == "server_error" and "injected failure" in err["message"]
            calls["fail_at"] = -1
            r = c.post("/v1/completions", json={"prompt": "Go on", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert app.state.engine.num_waiting == 0 and app.state.engine.num_active == 0
    finally:
        s.close()


def test_server_fault_is_a_500(threads):
    """A bug in a handler gives a 500 in OpenAI's shape, and the server serves on."""
    from engine.server.app import create_app
    app = create_app(_llm(), served_model_name=MODEL, chat_prompt=lambda q: 1 / 0)
    s = Server(app)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            err = _err(r, 500)
            assert err["type"] == "server_error" and "ZeroDivisionError" in err["message"]
            assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        s.close()


def test_added_middleware_sees_hot_routes(llm, engine):
    """The hot routes skip FastAPI's middleware stack only while nobody added any."""
    from engine.server.app import create_app
    app = create_app(llm, served_model_name=MODEL, engine=engine, api_key=KEY)
    seen = []

    @app.middleware("http")
    async def tag(request, call_next):
        seen.append(request.url.path)
        response = await call_next(request)
        response.headers["x-seen"] = "1"
        return response

    s = Server(app)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert _err(c.post("/v1/completions", json={"prompt": "hi"}), 401)   # the gate still runs
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200 and r.headers["x-seen"] == "1"
        assert seen == ["/v1/completions"] * 2      # it wraps the gate, as FastAPI orders them
    finally:
        s.close()


def test_graceful_shutdown(threads):
    from engine.server.app import create_app
    llm = _llm()
    app = create_app(llm, served_model_name=MODEL)
    s = Server(app)
    got = {}

    def stream():
        with httpx.Client(base_url=s.url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": "Go on", "max_tokens": 60,
                                                           "temperature": 0, "stream": True}) as r:
                got["events"] = sse_events(r.iter_lines())

    with httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        t = threading.Thread(target=stream)
        t.start()
        t0 = time.monotonic()
        while app.state.engine.num_active == 0 and time.monotonic() - t0 < 10:
            time.sleep(0.002)
        s.server.handle_exit(signal.SIGTERM, None)      # what uvicorn does on SIGTERM
        try:
            r = c.post("/v1/completions", json={"prompt": "new", "max_tokens": 2})
            assert _err(r, 503)["code"] == "draining"
        except httpx.TransportError:
            pass                                          # or the listener is already closed
        t.join(30)
    assert got["events"][-1] == "[DONE]"
    assert got["events"][-2]["choices"][0]["finish_reason"] == "length"
    s.thread.join(15)
    assert not s.thread.is_alive()


def test_a_failed_request_is_a_500_or_an_sse_error_and_the_others_go_on(client, llm, engine,
                                                                      monkeypatch):
    """A request that fails in the engine (here its row is failed after two tokens, as a
    broken logits processor would) gets a 500, or an SSE error event after the text it
    had, then [DONE]; a healthy request beside it is served whole."""
    free = llm.block_manager.num_free_blocks
    real = llm.sampler.launch

    def launch(logits, seqs, ops):
        pending = real(logits, seqs, ops)
        for i, s in enumerate(seqs):
            req = llm.core.requests.get(s.request_id)
            if req is not None and req.prompt and "FAILME" in req.prompt and s.num_generated_tokens >= 2:
                pending.failed[i] = "injected failure"
        return pending
    monkeypatch.setattr(llm.sampler, "launch", launch)
    err = _err(client.post("/v1/completions", json={"prompt": "FAILME now", "max_tokens": 8,
                                                     "temperature": 0}), 500)
    assert "injected failure" in err["message"] and err["code"] == "request_failed"
    with client.stream("POST", "/v1/completions", json={"prompt": "FAILME now", "max_tokens": 8,
                                                        "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and "injected failure" in events[-2]["error"]["message"]
    assert events[-2]["error"]["code"] == "request_failed"
    two = reference(llm, engine, "FAILME now", max_tokens=2).outputs[0].text
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == two
    ok = client.post("/v1/completions", json={"prompt": "Alpacas", "max_tokens": 5, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
    assert wait_idle(engine, llm, free)


def test_a_dead_engine_answers_500_and_health_says_so(threads):
    from engine.server.app import create_app
    llm = _llm()
    app = create_app(llm, served_model_name=MODEL)

    def broken(*a, **k):
        raise RuntimeError("device lost")
    llm.model.forward = broken
    s = Server(app)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            err = _err(c.post("/v1/completions", json={"prompt": "Go on", "max_tokens": 4}), 500)
            assert "device lost" in err["message"]
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "dead"
            err = _err(c.post("/v1/completions", json={"prompt": "Go on", "max_tokens": 4}), 500)
            assert err["code"] == "engine_dead" and "device lost" in err["message"]
    finally:
        s.close()
