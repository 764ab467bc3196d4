"""`n` on completions and chat, and `echo` with `logprobs` on completions, through the
real `openai` SDK against the server (a real uvicorn, tests/test_server.py's harness).
References: the engine in-process (n samples with seed + i, prompt_logprobs)."""
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from engine import SamplingParams  # noqa: E402
from tests.test_server import MODEL, Server, _llm, app, engine, llm, reference, threads  # noqa: E402, F401  # noqa: E402, F401  (fixtures)


@pytest.fixture(scope="module")
def server(app):  # noqa: F811
    s = Server(app)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def in_process(llm, engine, prompt, params):  # noqa: F811
    with engine.lock:
        assert not llm.has_unfinished_requests()
        return llm.generate([prompt], params, use_tqdm=False)[0]


def test_completions_n_gives_each_prompts_samples_in_order(client, llm, engine):  # noqa: F811
    params = dict(temperature=0.9, max_tokens=8, seed=21)
    r = client.completions.create(model=MODEL, prompt=["The llama", "An alpaca"], n=3, **params)
    assert [c.index for c in r.choices] == list(range(6))
    for i, prompt in enumerate(["The llama", "An alpaca"]):
        want = in_process(llm, engine, prompt, SamplingParams(n=3, **params))
        assert [c.text for c in r.choices[3 * i:3 * i + 3]] == [c.text for c in want.outputs]
    assert r.usage.completion_tokens == sum(len(c.token_ids) for p in ["The llama", "An alpaca"]
                                            for c in in_process(llm, engine, p, SamplingParams(n=3, **params)).outputs)
    stream = client.completions.create(model=MODEL, prompt="The llama", n=3, stream=True, **params)
    texts = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[k] for k in range(3)] == [c.text for c in r.choices[:3]]


def test_chat_n(client, llm, engine):  # noqa: F811
    messages = [{"role": "user", "content": "What is a llama?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, n=2, temperature=0.8, seed=3, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in r.choices)
    stream = client.chat.completions.create(model=MODEL, messages=messages, n=2, temperature=0.8, seed=3,
                                            max_tokens=6, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]


def test_echo_with_logprobs_scores_the_prompt(client, llm, engine):  # noqa: F811
    prompt = "The llama is a domesticated camelid"
    want = in_process(llm, engine, prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    c = r.choices[0]
    assert c.text == prompt
    lp = c.logprobs
    ids = want.prompt_token_ids
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(want.prompt_logprobs[j][ids[j]].logprob, abs=1e-5)
        assert len(lp.top_logprobs[j]) >= 2
    assert lp.text_offset == sorted(lp.text_offset)
    # echo with a completion: the prompt, then the greedy text, log-probs of both
    g = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=5, temperature=0)
    ref = reference(llm, engine, prompt, max_tokens=5)
    assert g.choices[0].text == prompt + ref.outputs[0].text
    assert len(g.choices[0].logprobs.tokens) == len(ids) + 5
    s = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=5, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in s) == g.choices[0].text
