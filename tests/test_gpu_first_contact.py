"""benchmarks/gpu_first_contact.py: the dry run (every step on CPU at tiny shapes),
the step selection, the deadline, and a failing or hanging step that is recorded
while the rest still run."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["probe", "kernels", "ceilings", "engine", "graphs", "decode", "profile", "sweep", "verify", "int8", "micro",
         "real", "knobs", "tests"]


def _run(tmp_path, *args, timeout=300):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": REPO, "OUT": str(out)}
    # the real-model step runs on the real-weight tests' model when it is already converted
    from engine.pypi_models import model_paths
    from tests.smollm2 import CACHE
    real = model_paths("smollm2", CACHE)[1]
    if os.path.isfile(os.path.join(real, ".converted")):
        env["SELFRAG_REAL_MODEL"] = real
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_first_contact.py"),
                        "--dry-run", *args], cwd=REPO, env=env, text=True, capture_output=True,
                       timeout=timeout)
    with open(out / "first_contact_dryrun.json") as f:
        return p, json.load(f), out


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fc"))


def test_dry_run_runs_every_step(dry):
    p, data, out = dry
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert data["order"] == STEPS and data["dry_run"] is True
    for name in STEPS:
        step = data["steps"][name]
        assert step["status"] == "ok", (name, step)
        assert step["seconds"] >= 0 and step["compiles"] == 0      # the interpreter compiles nothing
    r = {n: data["steps"][n]["result"] for n in STEPS}
    assert r["probe"]["kernels"] >= 8 and r["probe"]["kernels_not_compiled"]   # interpreted on CPU
    assert r["kernels"]["all_ok"] and len(r["kernels"]["cases"]) >= 14
    assert {c["case"].split("[")[0] for c in r["kernels"]["cases"]} >= {
        "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope_and_write_kv", "prefill", "decode",
        "greedy_argmax", "gather_logprobs", "quantize_int8", "w8a16_linear"}
    assert r["ceilings"]["copy"]["gb_per_s"] > 0 and set(r["ceilings"]["gemv"]) == {
        "qkv", "o", "gate_up", "down", "lm_head"}
    assert r["graphs"]["graph_vs_eager_same_splits"]["identical_tokens"]
    d = r["decode"]
    assert d["ttft_ms"] > 0 and d["tpot_ms"]["n"] == 7 and d["compiles_after_warmup"] == 0
    assert set(d["step_split_ms"]) == {"schedule", "prepare", "launch", "sample", "wait", "output"}
    assert d["host_ms_per_step"] == pytest.approx(
        sum(v for k, v in d["step_split_ms"].items() if k != "wait"))
    assert [row["batch"] for row in r["sweep"]["rows"]] == [2, 4]
    assert r["micro"]["decode"] and r["micro"]["prefill"]
    assert r["int8"]["int8_weight_bytes"] < r["int8"]["fp16_weight_bytes"] and r["int8"]["speedup"] > 0
    assert r["int8"]["fp8_speedup"] > 0
    assert r["knobs"]["plain_ms"] > 0 and r["knobs"]["knobs_ms"] > 0
    if "skipped" not in r["real"]:      # fp32 on the CPU against the fp32 reference: exact picks
        res = r["real"]["results"]["float32"]
        assert res["top1_agreement"] == 1.0 and res["max_chosen_logprob_error"] < 1e-3, res
    assert r["tests"]["rc"] == 0 and r["tests"]["counts"].get("passed") == 1


def test_dry_run_output_fits_the_device_tool(dry):
    """At most 8 files come back, at most 2 folders deep, names of [A-Za-z0-9._-]."""
    _, data, out = dry
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert 4 <= len(files) <= 8
    for f in files:
        rel = os.path.relpath(f, out)
        assert rel.count(os.sep) <= 2 and all(c.isalnum() or c in "._-" for c in os.path.basename(f))
    names = {os.path.basename(f) for f in files}
    assert {"first_contact_dryrun.json", "first_contact.log", "first_contact_profile.txt",
            "first_contact_tests.log", "first_contact_sweep.png"} <= names
    log = (out / "first_contact.log").read_text()
    assert all(f"== {s}" in log for s in STEPS)


def test_steps_subset_builds_the_engine_it_needs(tmp_path):
    p, data, _ = _run(tmp_path, "--steps", "decode,probe")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert data["order"] == ["probe", "engine", "decode"]


def test_deadline_skips_what_does_not_fit(tmp_path):
    p, data, _ = _run(tmp_path, "--steps", "probe,ceilings", "--deadline", "0")
    assert p.returncode == 0
    assert [s["status"] for s in data["steps"].values()] == ["skipped", "skipped"]
    assert "left" in data["steps"]["probe"]["reason"]


def test_a_raising_step_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    from benchmarks import gpu_first_contact as fc
    real = fc._step_functions

    def broken():
        fns = real()
        fns["probe"] = lambda ctx: 1 / 0
        return fns
    monkeypatch.setattr(fc, "_step_functions", broken)
    monkeypatch.setenv("OUT", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        assert fc.main(["--dry-run", "--steps", "probe,ceilings"]) == 1
    finally:
        torch.set_num_threads(threads)          # the dry run pins one thread
    data = json.loads((tmp_path / "first_contact_dryrun.json").read_text())
    assert data["steps"]["probe"]["status"] == "error"
    assert "ZeroDivisionError" in data["steps"]["probe"]["error"]
    assert data["steps"]["ceilings"]["status"] == "ok"


def test_a_hanging_step_is_stopped_at_the_deadline(tmp_path):
    from benchmarks.first_contact.common import Context, T0, run_step
    ctx = Context(True, time.perf_counter() - T0 + 3, "cpu", None, "fc_test_hang", str(tmp_path))
    ctx.save = lambda: []                       # keep benchmarks/results/ untouched
    t = time.perf_counter()
    run_step(ctx, "hang", lambda c: time.sleep(30), need_s=0)
    assert time.perf_counter() - t < 10
    assert ctx.payload["steps"]["hang"]["status"] == "timeout"


def test_staged_check_kills_a_silent_hang_and_keeps_its_output(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py (make gpu-check-full): a stage's subprocess that prints, then
    hangs without printing, is killed at the budget (rc 124) with what it printed kept."""
    from benchmarks import gpu_check
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "STAGE_BUDGET_S", 4)
    st = gpu_check.Stage("hang", dry=True)
    t = time.perf_counter()
    r = st.run([sys.executable, "-c", "import time; print('before the hang', flush=True); time.sleep(60)"],
               reserve=1)
    assert time.perf_counter() - t < 20
    assert r["rc"] == 124 and "before the hang" in r["tail"]
    assert "before the hang" in (tmp_path / "gpu_check_hang.log").read_text()
