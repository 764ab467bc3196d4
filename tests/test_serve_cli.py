"""`selfrag serve` as a user starts it: port checks before anything loads, --port 0's
real port in the printed URL, the engine's flags, the key from $SELFRAG_API_KEY, the
access log, and help text on every flag. Real subprocesses over the embedded model."""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "selfrag.cli", "serve", "--device", "cpu", *args],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _url_of(p, timeout=60.0) -> str:
    """Reads stderr until the 'selfrag serve: ... on http://HOST:PORT/v1' line."""
    t0 = time.monotonic()
    lines = []
    while time.monotonic() - t0 < timeout:
        line = p.stderr.readline()
        if not line:
            raise AssertionError(f"serve exited: {''.join(lines)}")
        lines.append(line)
        m = re.search(r"on (http://\S+)/v1", line)
        if m:
            p.url_line = line
            return m.group(1)
    raise AssertionError("no URL line")


def _stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_port_is_refused_before_anything_loads(port):
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "selfrag.cli", "serve", "--port", port], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--port" in p.stderr
    assert time.monotonic() - t < 10 and "selfrag serve: model" not in p.stderr


def test_a_busy_port_is_reported_before_the_model_loads():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "selfrag.cli", "serve", "--port", str(port)], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in p.stderr and "in use" in p.stderr
    assert "selfrag serve: model" not in p.stderr


def test_port_0_prints_the_real_port_and_engine_flags_reach_the_engine():
    p = _serve("--port", "0", "--max-model-len", "256", "--max-num-seqs", "3", "--num-kv-blocks", "40",
               "--no-prefix-caching", "--access-log", "--dtype", "float32", "--quantization", "int8",
               env={"SELFRAG_API_KEY": "from-env"})
    try:
        url = _url_of(p)
        port = int(url.rsplit(":", 1)[1])
        assert port != 0
        assert httpx.get(url + "/v1/models").status_code == 401               # the env key is on
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200 and r.json()["data"][0]["max_model_len"] == 256
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer from-env"},
                       json={"model": r.json()["data"][0]["id"], "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        metrics = httpx.get(url + "/metrics").text
        assert re.search(r"^selfrag:kv_blocks_total 40(\.0)?$", metrics, re.M), metrics[:2000]
    finally:
        _stop(p)
    logged = p.stdout.read() + p.stderr.read()          # uvicorn's access log goes to stdout
    assert '"GET /v1/models HTTP/1.1" 200' in logged                         # --access-log
    assert "(float32, int8 weights)" in p.url_line                          # --quantization


def test_every_serve_flag_has_help_text():
    from selfrag.cli.serve import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {f.option_strings[0] for f in flags} >= {
        "--max-num-seqs", "--max-model-len", "--num-kv-blocks", "--gpu-memory-utilization",
        "--kernel-backend", "--no-prefix-caching", "--enforce-eager", "--dtype", "--access-log"}
    assert [f.option_strings[0] for f in flags if not f.help] == []
    dtype = next(f for f in flags if f.option_strings[0] == "--dtype")
    assert set(dtype.choices) >= {"auto", "float16", "bfloat16", "float32"}


def test_served_model_id_is_the_name_the_model_was_asked_by(tmp_path):
    """As vLLM serves ``--model X`` as ``X``: a named model keeps its name (also the default
    Self-RAG SmolLM2, whose directory's name carries an adapter hash); a path its basename."""
    from selfrag.cli.serve import served_name
    smollm2 = tmp_path / "selfrag-smollm2-0123456789ab"
    smollm2.mkdir()
    (smollm2 / "selfrag_adapter.json").write_text("{}")
    assert served_name("selfrag-smollm2", str(smollm2)) == "selfrag-smollm2"
    assert served_name(None, str(smollm2)) == "selfrag-smollm2"
    assert served_name("miniature", "/x/selfrag/data/default-v3") == "miniature"
    assert served_name(None, "/x/selfrag/data/default-v3/") == "default-v3"
    assert served_name(str(smollm2), str(smollm2)) == "selfrag-smollm2-0123456789ab"
