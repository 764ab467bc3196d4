"""Chat requests render every message (the checkpoint's chat_template as transformers
renders it, else the server's format, else the default), text content parts, the
context-length check, refused fields, and the operator endpoints' small rules.
A real uvicorn on loopback over the embedded model (random weights, CPU)."""
import json
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from engine import LLM, SamplingParams  # noqa: E402
from engine.server.app import create_app  # noqa: E402
from engine.server.chat import ChatRenderer, normalize_messages  # noqa: E402
from engine.server.protocol import ChatCompletionRequest  # noqa: E402
from selfrag.default_model import few_threads, random_model_dir  # noqa: E402
from selfrag.prompts import render_chat  # noqa: E402
from tests.test_server import Server, _err  # noqa: E402

# Llama-2's chat template (as published with meta-llama/Llama-2-7b-chat-hf), the kind of
# template a checkpoint's tokenizer_config.json carries.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is a llama?"},
                {"role": "assistant", "content": "A camelid of the Andes."},
                {"role": "user", "content": "And an alpaca?"}]


@pytest.fixture(scope="module")
def llm():
    with few_threads(1):
        yield LLM(random_model_dir(), dtype="float32", device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def templated_dir(tmp_path_factory):
    """The embedded model with a chat_template in its tokenizer_config.json."""
    d = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(random_model_dir(), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = LLAMA2_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(d)


def _messages(raw):
    return normalize_messages(ChatCompletionRequest.model_validate({"messages": raw}).messages)


def test_a_checkpoint_chat_template_renders_as_transformers_does(templated_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(templated_dir)
    want = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"]) if hasattr(want, "keys") else list(want)   # transformers 5: a BatchEncoding
    llm = LLM(templated_dir, dtype="float32", device="cpu", show_progress=False)
    renderer = ChatRenderer(llm, render_chat)
    got = renderer(_messages(CONVERSATION))
    assert got["prompt_token_ids"] == want
    assert got["prompt"].startswith("<s>[INST] <<SYS>>\nAnswer briefly.")
    assert renderer.source.startswith("the checkpoint")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        renderer(_messages(bad))


def test_without_a_template_the_servers_format_keeps_every_message(llm):
    assert ChatRenderer(llm, render_chat)(_messages(CONVERSATION))["prompt"] == (
        "### Instruction:\nAnswer briefly.\n\nWhat is a llama?\n\n### Response:\n"
        "A camelid of the Andes.\n\n### Instruction:\nAnd an alpaca?\n\n### Response:\n")
    assert ChatRenderer(llm, None)(_messages(CONVERSATION))["prompt"] == (
        "System: Answer briefly.\nUser: What is a llama?\nAssistant: A camelid of the Andes.\n"
        "User: And an alpaca?\nAssistant:")


@pytest.fixture(scope="module")
def client(llm):
    from selfrag.server import selfrag_routes
    s = Server(create_app(llm, served_model_name="m", api_key="k3y", chat_prompt=render_chat,
                          rag=selfrag_routes(), max_tokens_cap=64))
    with httpx.Client(base_url=s.url, timeout=60, headers={"Authorization": "Bearer k3y"}) as c:
        yield c
    s.close()


def _chat(client, messages, **kw):
    return client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "temperature": 0,
                                                     "max_tokens": 6, **kw})


def test_chat_reaches_the_model_with_every_message_and_text_parts(client, llm):
    prompt = render_chat(CONVERSATION)
    want = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    r = _chat(client, CONVERSATION)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want.outputs[0].text
    assert r.json()["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"},
                                          {"type": "text", "text": "an alpaca?"}]}]
    joined = [{"role": "user", "content": "What is\nan alpaca?"}]
    assert _chat(client, parts).json()["choices"] == _chat(client, joined).json()["choices"]


@pytest.mark.parametrize("messages,param", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages.0.content.0.type"),
    ([{"role": "tool", "content": "42"}], "messages.0.role"),
    ([{"role": "system", "content": "only a system message"}], "messages"),
])
def test_bad_messages_are_400(client, messages, param):
    assert _err(_chat(client, messages), 400)["param"] == param


def test_max_tokens_past_the_context_is_400(client, llm):
    """A prompt of ~2010 tokens plus max_tokens=60 (under the server's cap of 64) does not
    fit max_model_len 2048: 400, not a silently shortened answer."""
    limit = llm.max_model_len
    words = ["alpaca"] * 700
    while len(llm.tokenizer.encode(render_chat([{"role": "user", "content": " ".join(words)}]))) < limit - 40:
        words += ["llama"] * 10
    chat = _chat(client, [{"role": "user", "content": " ".join(words)}], max_tokens=60)
    comp = client.post("/v1/completions", json={"model": "m", "prompt": [5] * (limit - 40), "max_tokens": 60})
    for r in (chat, comp):
        err = _err(r, 400)
        assert err["param"] == "max_tokens" and f"maximum context length is {limit}" in err["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 64    # default: fits, capped


@pytest.mark.parametrize("field,value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("response_format", {"type": "json_object"}),
                                         ("best_of", 3)])
def test_unimplemented_fields_are_400_naming_them(client, field, value):
    err = _err(_chat(client, [{"role": "user", "content": "Hi"}], **{field: value}), 400)
    assert err["param"] == field and field in err["message"]


def test_client_description_and_neutral_values_are_accepted(client):
    r = _chat(client, [{"role": "user", "content": "Hi"}], user="u1", metadata={"a": "b"},
              presence_penalty=0, tools=[], store=False)
    assert r.status_code == 200, r.text


def test_auth_scheme_is_case_insensitive_and_probes_need_no_key(client):
    body = {"model": "m", "prompt": "Hi", "max_tokens": 2}
    for scheme in ("bearer", "BEARER", "Bearer"):
        r = httpx.post(str(client.base_url) + "/v1/completions", json=body,
                       headers={"Authorization": f"{scheme} k3y"})
        assert r.status_code == 200, (scheme, r.text)
    assert httpx.post(str(client.base_url) + "/v1/completions", json=body,
                      headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.get(str(client.base_url) + "/version")
    assert r.status_code == 200 and r.json()["version"]


def test_selfrag_answer_checks_model_and_refuses_stream(client):
    body = {"question": "What is an alpaca?", "passages": [{"title": "A", "text": "An alpaca."}],
            "mode": "always", "max_tokens": 4}
    assert _err(client.post("/v1/selfrag/answer", json={**body, "model": "other"}), 404)["param"] == "model"
    err = _err(client.post("/v1/selfrag/answer", json={**body, "stream": True}), 400)
    assert err["param"] == "stream" and "not supported" in err["message"]
    r = client.post("/v1/selfrag/answer", json={**body, "model": "m"})
    assert r.status_code == 200 and r.json()["error"] is None


def _scrape(client) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(str(client.base_url) + "/metrics")                 # no key needed
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_prometheus_metrics_count_what_happened(client, llm):
    pytest.importorskip("prometheus_client")
    before = _scrape(client)
    prompt = "Alpacas are " + "camelids of the Andes, " * 12                # several full KV blocks
    body = {"model": "m", "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    for _ in range(3):
        assert client.post("/v1/completions", json=body).status_code == 200
    assert client.post("/v1/completions", json={**body, "model": "nope"}).status_code == 404
    after = _scrape(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    prompt_len = len(llm.tokenizer.encode(prompt))
    assert delta("vllm:generation_tokens_total") == 15
    assert delta("vllm:prompt_tokens_total") == 3 * prompt_len
    assert delta("vllm:time_to_first_token_seconds_count") == 3
    assert delta("vllm:inter_token_latency_seconds_count") == 12          # 4 gaps per request
    assert delta("vllm:request_success_total", finished_reason="length") == 3
    assert delta("http_requests_total", handler="/v1/completions", method="POST", status="200") == 3
    assert delta("http_requests_total", handler="/v1/completions", method="POST", status="404") == 1
    assert after[("vllm:num_requests_running", ())] == 0
    assert after[("selfrag:kv_blocks_total", ())] == llm.block_manager.num_blocks
    assert after[("selfrag:kv_blocks_used", ())] + after[("selfrag:kv_blocks_free", ())] == \
        llm.block_manager.num_blocks
    assert delta("vllm:prefix_cache_hits_total") > 0                    # the same prompt three times
    rate = after[("vllm:gpu_prefix_cache_hit_rate", ())]
    assert rate == pytest.approx(after[("vllm:prefix_cache_hits_total", ())]
                                 / after[("vllm:prefix_cache_queries_total", ())])
    assert ("vllm:num_preemptions_total", ()) in after


def test_sampling_knobs_pass_through_and_bad_values_are_400(client):
    """OpenAI's and vLLM's knobs reach SamplingParams (include_stop_str_in_output keeps
    the stop string; a -100 logit_bias on every token the answer used changes it); a bad
    value is a 400 naming the field."""
    msgs = [{"role": "user", "content": "Hi"}]
    base = _chat(client, msgs, max_tokens=16, temperature=0, logprobs=True).json()
    text = base["choices"][0]["message"]["content"]
    stop = text[4:7]
    assert len(stop) == 3 and text.index(stop) == 4
    for include, want in ((False, text[:4]), (True, text[:7])):
        r = _chat(client, msgs, max_tokens=16, temperature=0, stop=[stop], include_stop_str_in_output=include)
        assert r.json()["choices"][0]["message"]["content"] == want, include
    biased = _chat(client, msgs, max_tokens=16, temperature=0,
                   logit_bias={str(t): -100 for t in range(0, 400)}).json()
    assert biased["choices"][0]["message"]["content"] != text
    r = _chat(client, msgs, max_tokens=4, temperature=0, presence_penalty=0.5, frequency_penalty=0.2,
              repetition_penalty=1.1, min_tokens=2, min_p=0.1, include_stop_str_in_output=True,
              bad_words=["zzz"])
    assert r.status_code == 200, r.text
    for field, value in (("presence_penalty", 3), ("repetition_penalty", 0), ("min_p", 2),
                         ("logit_bias", {"5": 500})):
        err = _err(_chat(client, msgs, **{field: value}), 400)
        assert field in err["message"], (field, err)
