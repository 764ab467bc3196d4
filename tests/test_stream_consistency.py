"""Streaming never sends text that the final output takes back.

Stop strings are drawn from the model's own free-running text (so they really occur,
often across a token boundary: the case where a streamed tail used to be cut from the
final text afterwards) and at random. For each stop set: the deltas of LLM.stream()
concatenate to generate()'s final text; every cumulative text the step API returns
is a prefix of the final one (async output processing on and off); and over HTTP the
SSE deltas of /v1/completions and /v1/chat/completions concatenate to the
non-streaming response's text."""
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine import LLM, SamplingParams
from selfrag.default_model import few_threads, random_model_dir
from selfrag.prompts import render_chat

PROMPTS = ["Alpacas live in", "The llama is", "One two three", "Where do camels"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llm():
    with few_threads(1):
        yield LLM(random_model_dir(), dtype="float32", device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def free_texts(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def stop_sets(n_prompts=len(PROMPTS)):
    """(prompt index, [(start, length) slices of its free text], [random strings])."""
    return st.tuples(st.integers(0, n_prompts - 1),
                     st.lists(st.tuples(st.integers(0, 80), st.integers(1, 6)), max_size=3),
                     st.lists(st.text(alphabet="abelt .,'\n", min_size=1, max_size=4), max_size=2))


def _params(free_texts, spec):
    i, slices, extra = spec
    text = free_texts[i]
    stops = [text[a:a + n] for a, n in slices if text[a:a + n]] + extra
    return i, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=stops or None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=stop_sets(), async_output=st.booleans())
def test_stream_and_step_outputs_never_take_text_back(llm, free_texts, spec, async_output):
    i, sp = _params(free_texts, spec)
    llm.async_output = False
    final = llm.generate([PROMPTS[i]], sp, use_tqdm=False)[0].outputs[0].text
    llm.async_output = async_output
    try:
        assert "".join(llm.stream(PROMPTS[i], sp)) == final
        rid = llm.add_request(PROMPTS[i], sp)
        seen = ""
        while llm.has_unfinished_requests():
            for out in llm.step():
                assert out.request_id == rid
                text = out.outputs[0].text
                assert final.startswith(text) and text.startswith(seen), (text, seen, final)
                seen = text
        assert seen == final
    finally:
        llm.async_output = False


def test_a_stop_string_split_across_tokens(llm, free_texts):
    """Deterministic: a stop string that starts inside one token's text and ends in a
    later one (the first streamed delta would have held its start)."""
    sp_free = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    rid = llm.add_request(PROMPTS[0], sp_free)
    ends = []
    while llm.has_unfinished_requests():
        for out in llm.step():
            ends.append(len(out.outputs[0].text))
    text = free_texts[0]
    cut = next(e for e in ends[1:] if 2 <= e < len(text) - 2)     # a token boundary
    stop = text[cut - 2:cut + 2]
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop)
    final = llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0].outputs[0]
    assert final.finish_reason == "stop" and final.text == text[:text.index(stop)]
    deltas = list(llm.stream(PROMPTS[0], sp))
    assert "".join(deltas) == final.text
    assert rid


# ---------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def client(llm):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from engine.server.app import create_app
    from tests.test_server import Server
    s = Server(create_app(llm, served_model_name="m", chat_prompt=render_chat))
    with httpx.Client(base_url=s.url, timeout=60) as c:
        yield c
    s.close()


def _sse_text(client, path, body, key):
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(key(c["choices"][0]) for c in chunks)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=stop_sets())
def test_sse_deltas_equal_the_final_text(client, free_texts, spec):
    i, sp = _params(free_texts, spec)
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stop": sp.stop_list}
    comp = {**body, "prompt": PROMPTS[i]}
    final = client.post("/v1/completions", json=comp).json()["choices"][0]["text"]
    assert _sse_text(client, "/v1/completions", comp, lambda c: c["text"]) == final
    chat = {**body, "messages": [{"role": "user", "content": PROMPTS[i]}]}
    final = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    assert _sse_text(client, "/v1/chat/completions", chat,
                     lambda c: c["delta"].get("content", "")) == final
