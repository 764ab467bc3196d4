"""benchmarks/bench_latency.py: the dry run end to end, and its arithmetic."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import bench_latency as bl  # noqa: E402

COMMON = ("device", "date", "commit", "dtype", "batch_size", "prompt_len", "output_len")


# ---------------------------------------------------------------------------- arithmetic
def test_kv_bytes_per_token_7b_fp16():
    cfg = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=32, head_dim=128)
    # K and V x 32 layers x 32 heads x 128 dims x 2 bytes = 512 KiB per token.
    assert bl.kv_bytes_per_token(cfg, 2) == 2 * 32 * 32 * 128 * 2 == 524288


def test_decode_bytes_per_step():
    # 1000 bytes of weights + 4 sequences x 10 tokens of context x 8 bytes.
    assert bl.decode_bytes_per_step(1000, 8, 4, 10) == 1000 + 320
    assert bl.decode_bytes_per_step(1000, 8, 1, 0) == 1000


def test_bandwidth_fraction_hand_computed():
    # 13.5 GB read in 6 ms = 2.25 TB/s; against a 3 TB/s copy: 0.75.
    assert math.isclose(bl.bandwidth_fraction(13.5e9, 6e-3, 3e12), 0.75)
    # Twice the time: half the fraction.
    assert math.isclose(bl.bandwidth_fraction(13.5e9, 12e-3, 3e12), 0.375)


def test_ceiling_hand_computed():
    # 3 TB/s / 13.5 GB = 222.2 steps/s; one token per sequence and step.
    assert math.isclose(bl.ceiling_tokens_per_s(1, 3e12, 13.5e9), 3e12 / 13.5e9)
    assert math.isclose(bl.ceiling_tokens_per_s(1, 3e12, 13.5e9), 222.2222, rel_tol=1e-6)
    assert math.isclose(bl.ceiling_tokens_per_s(64, 3e12, 13.5e9), 64 * 222.2222, rel_tol=1e-6)
    # At the ceiling, the fraction is 1 by construction.
    step_s = 1 / bl.ceiling_tokens_per_s(1, 3e12, 13.5e9)
    assert math.isclose(bl.bandwidth_fraction(13.5e9, step_s, 3e12), 1.0)


def test_throughput_workload_is_seeded_and_in_range():
    P = dict(bl.PROFILES["gpu"])
    p1, o1 = bl.throughput_workload(P, 32016)
    p2, o2 = bl.throughput_workload(P, 32016)
    assert p1 == p2 and o1 == o2 and len(p1) == len(o1) == 256
    assert all(100 <= len(p) <= 1024 for p in p1) and all(100 <= o <= 1024 for o in o1)
    assert all(0 <= t < 32016 for p in p1[:4] for t in p)
    # A prefix of the workload is the smaller workload (HF runs on a prefix).
    p3, o3 = bl.throughput_workload(P, 32016, 16)
    assert p3 == p1[:16] and o3 == o1[:16]


# ---------------------------------------------------------------------------- dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    path = str(out / "latency_dryrun_test.json")
    env = {**os.environ, "PYTHONPATH": REPO, "OUT": str(out)}
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_latency.py"),
                        "--dry-run", "--out", path, "--max-seconds", "120", "--quantization", "int8"],
                       cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(path) as f:
        return json.load(f), p.stdout


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dry_run_has_every_stage(dry_run):
    data, _ = dry_run
    assert data["profile"] == "dry" and data["errors"] == {} and data["notes"] == []
    stages = {r["stage"] for r in data["records"]}
    assert stages == {"latency", "sweep", "throughput", "hf_latency", "hf_throughput",
                      "hf_static_latency", "quantized"}
    assert sorted(r["batch_size"] for r in data["records"] if r["stage"] == "sweep") == [1, 4, 16]
    for key in COMMON:
        assert key in data["copy"]
    for r in data["records"]:
        for key in COMMON:
            assert key in r, (r["stage"], key)
        assert _positive(r["batch_size"]) and _positive(r["prompt_len"]) and _positive(r["output_len"])
        assert r["dtype"] == "float32"


def test_dry_run_values_are_sane(dry_run):
    data, _ = dry_run
    assert _positive(data["copy"]["copy_bytes_per_s"]) and _positive(data["weight_bytes"])
    by = {}
    for r in data["records"]:
        by.setdefault(r["stage"], []).append(r)
    lat = by["latency"][0]
    for key in ("ttft_ms", "tpot_ms", "decode_tokens_per_s", "host_ms_per_step",
                "bytes_per_decode_step", "ceiling_tokens_per_s"):
        assert _positive(lat[key]), key
    assert 0 < lat["bandwidth_fraction"] < 1.5
    assert 0 < lat["host_fraction_of_step"] < 1.5
    assert math.isclose(lat["decode_tokens_per_s"], 1e3 / lat["tpot_ms"])
    assert lat["bytes_per_decode_step"] > lat["weight_bytes"] == data["weight_bytes"]
    assert set(lat["step_split_ms"]) == {"schedule", "prepare", "launch", "sample", "wait", "output"}
    assert math.isclose(lat["host_ms_per_step"],
                        sum(v for k, v in lat["step_split_ms"].items() if k != "wait"))
    # The recorded fraction and ceiling follow from the recorded numbers.
    bw = data["copy"]["copy_bytes_per_s"]
    assert math.isclose(lat["bandwidth_fraction"],
                        lat["bytes_per_decode_step"] / (lat["tpot_ms"] / 1e3) / bw, rel_tol=1e-9)
    for r in by["sweep"]:
        for key in ("tpot_ms", "decode_tokens_per_s", "output_tokens_per_s", "ttft_ms",
                    "ceiling_tokens_per_s", "ceiling_with_kv_tokens_per_s"):
            assert _positive(r[key]), (r["batch_size"], key)
        assert 0 < r["bandwidth_fraction"] < 1.5
        assert math.isclose(r["ceiling_tokens_per_s"], r["batch_size"] * bw / data["weight_bytes"])
        assert r["ceiling_with_kv_tokens_per_s"] <= r["ceiling_tokens_per_s"]
        assert r["decode_tokens_per_s"] < r["ceiling_tokens_per_s"]
    tp = by["throughput"][0]
    assert tp["num_requests"] == 8 and _positive(tp["output_tokens_per_s"])
    _, outs = bl.throughput_workload(bl.PROFILES["dry"], 320)
    assert tp["output_tokens"] == sum(outs)       # ignore_eos: every requested token
    for st in ("hf_latency", "hf_static_latency"):
        r = by[st][0]
        assert _positive(r["ttft_ms"]) and _positive(r["tpot_ms"])
        assert _positive(r["speedup_vs_hf"]["tpot"]) and _positive(r["speedup_vs_hf"]["ttft"])
        # Same weights, same prompt, greedy, fp32: HF picks the engine's tokens.
        assert r["leading_tokens_equal_to_engine"] == r["output_len"]
    hf_tp = by["hf_throughput"][0]
    assert _positive(hf_tp["output_tokens_per_s"]) and _positive(hf_tp["speedup_vs_hf"])
    assert hf_tp["output_tokens"] == tp["output_tokens"]
    # --quantization int8: both weight formats at batch 1 and 16, int8's bytes the smaller
    q = {(r["weights"], r["batch_size"]): r for r in by["quantized"]}
    assert set(q) == {("float32", 1), ("float32", 16), ("int8", 1), ("int8", 16)}
    for (w, b), r in q.items():
        assert _positive(r["decode_tokens_per_s"]) and _positive(r["bandwidth_fraction"])
        assert math.isclose(r["bandwidth_fraction"], r["bytes_per_decode_step"] / (r["tpot_ms"] / 1e3) / bw)
        if w == "int8":
            assert math.isclose(r["speedup_vs_float32"],
                                r["decode_tokens_per_s"] / q[("float32", b)]["decode_tokens_per_s"])
    assert q[("int8", 1)]["weight_bytes"] < q[("float32", 1)]["weight_bytes"] == data["weight_bytes"]


def test_dry_run_png(dry_run):
    _, stdout = dry_run
    pytest.importorskip("matplotlib")
    assert "latency_dryrun_test.png" in stdout
    png = [line.split()[-1] for line in stdout.splitlines() if line.endswith(".png")][0]
    assert os.path.getsize(png) > 1000


def test_budget_skips_with_a_note(tmp_path):
    path = str(tmp_path / "latency_budget.json")
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_latency.py"),
                        "--dry-run", "--out", path, "--max-seconds", "0", "--stages", "latency,sweep"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, text=True,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(path) as f:
        data = json.load(f)
    assert data["records"] == []
    assert any("latency skipped" in n for n in data["notes"])
    assert any("sweep skipped" in n for n in data["notes"])


def test_quantized_stage_frees_each_engine_before_building_the_next():
    """Each engine sizes its KV pool from the memory free at its start: the 8-bit engine must
    not be built while the run's engine is still referenced (by the holder or a local)."""
    import weakref

    from benchmarks.latency_quantized import stage_quantized
    alive_at_build, refs = [], []

    class Engine:
        def __init__(self, quant):
            self.config = type("C", (), {"vocab_size": 100})()
            self.model = type("M", (), {"num_bytes": lambda s: 10 if quant else 20, "dtype": "torch.float16"})()

    def build(quant):
        alive_at_build.append(sum(r() is not None for r in refs))
        e = Engine(quant)
        refs.append(weakref.ref(e))
        return e
    holder = {"llm": build(None)}
    helpers = (lambda llm, prompts, n, sync: dict(t_end=2.0, t_all=1.0, decode_steps=4),
               lambda b, n, vocab, seed: [[1] * n] * b, lambda W, kvt, b, ctx: W + b, lambda **kw: kw)
    rows = stage_quantized(holder, build, "int8", dict(prompt_len=8, sweep_output_len=4), {}, 1.0, 1, None, helpers)
    assert alive_at_build == [0, 0]
    assert [r["weights"] for r in rows] == ["float16", "float16", "int8", "int8"]
