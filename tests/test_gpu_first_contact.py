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
STEPS = ["probe", "ceilings", "engine", "verify", "decode", "graphs", "kernels", "profile", "sweep",
         "int8", "micro", "real", "knobs", "tests"]


def _run(tmp_path, *args, timeout=300):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "SELFRAG_REAL_MODEL"}
    env.update(PYTHONPATH=REPO, OUT=str(out))
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
    # each GEMV timed over weight copies that together span more than 4x the (stand-in) L2
    for g in r["ceilings"]["gemv"].values():
        assert g["copies"] * g["N"] * g["K"] * 4 > 4 * r["ceilings"]["l2_bytes"], g
    assert r["graphs"]["graph_vs_eager_same_splits"]["identical_tokens"]
    d = r["decode"]
    assert d["ttft_ms"] > 0 and d["tpot_ms"]["n"] == 7 and d["compiles_after_warmup"] == 0
    assert set(d["step_split_ms"]) == {"schedule", "prepare", "launch", "sample", "wait", "output"}
    assert d["host_ms_per_step"] == pytest.approx(
        sum(v for k, v in d["step_split_ms"].items() if k != "wait"))
    # CPU default: off; the other mode (async) has one more call: the last step read back
    assert d["tpot_other_mode_ms"]["n"] == 8 and d["async_scheduling"] is False and d["same_tokens_both_modes"]
    assert d["eager_host_profile"] and d["eager_host_profile"][0]["own_ms_per_step"] > 0
    assert set(d["targets"]) >= {"ttft_le_2_5x_weight_read", "eager_host_le_5ms", "tpot_le_1_03x_bare_replay"}
    v = r["verify"]
    assert v["batch_1"]["same_tokens"] and v["batch_2"]["same_tokens"] and not v["failures"]
    assert v["wall_batch_1"]["speedup"] > 0 and len(v["wall_batch_1"]["pairs_s"]) == 1
    assert set(v["targets"]) == {"batch1_le_1_15", "batch16_le_1_25", "speculative_ge_2x_plain"}
    assert [row["batch"] for row in r["sweep"]["rows"]] == [2, 4]
    assert r["micro"]["decode"] and r["micro"]["prefill"]
    assert r["int8"]["int8_weight_bytes"] < r["int8"]["fp16_weight_bytes"] and r["int8"]["speedup"] > 0
    assert r["int8"]["fp8_speedup"] > 0
    assert r["knobs"]["plain_ms"] > 0 and r["knobs"]["knobs_ms"] > 0
    # the embedded trained model, fp32 on the CPU against HF's fp32: exact picks
    res = r["real"]["results"]["float32"]
    assert r["real"]["model"].endswith("default-v3") and r["real"]["prompts"] == 6
    assert res["steps_compared"] >= 40 and res["top1_agreement"] == 1.0, res
    assert res["max_chosen_logprob_error"] < 1e-3, res
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


def _run_here(tmp_path, monkeypatch, *args):
    """The dry run in this process (no second torch import): (exit status, the JSON)."""
    from benchmarks import gpu_first_contact as fc
    monkeypatch.setenv("OUT", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        rc = fc.main(["--dry-run", *args])
    finally:
        torch.set_num_threads(threads)          # the dry run pins one thread
    return rc, json.loads((tmp_path / "first_contact_dryrun.json").read_text())


def test_steps_subset_builds_the_engine_it_needs(tmp_path, monkeypatch):
    rc, data = _run_here(tmp_path, monkeypatch, "--steps", "decode,probe")
    assert rc == 0, data
    assert data["order"] == ["probe", "engine", "decode"]


def test_deadline_skips_what_does_not_fit(tmp_path, monkeypatch):
    rc, data = _run_here(tmp_path, monkeypatch, "--steps", "probe,ceilings", "--deadline", "0")
    assert rc == 0
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
    from benchmarks.first_contact.common import T0, Context, run_step
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


def test_every_engine_is_freed_before_the_next_is_built(tmp_path, monkeypatch):
    """Each engine sizes its KV pool from the memory free when it starts: one left alive (a
    local in a step, the shared one) gave the H200's int8 engine 0 blocks. An LLM subclass
    records, at each construction, how many earlier engines are still alive (weak references,
    no collection forced here: the steps must free them)."""
    import weakref

    import engine
    from benchmarks import gpu_first_contact as fc
    from benchmarks.first_contact.common import T0, Context, run_step
    built, refs = [], []

    class Tracked(engine.LLM):
        def __init__(self, model, *args, **kw):
            built.append((kw.get("quantization"), sum(r() is not None for r in refs)))
            super().__init__(model, *args, **kw)
            refs.append(weakref.ref(self))
    monkeypatch.setattr(engine, "LLM", Tracked)
    monkeypatch.delenv("SELFRAG_REAL_MODEL", raising=False)
    ctx = Context(True, time.perf_counter() - T0 + 600, "cpu", None, "fc_test_lifetime", str(tmp_path))
    ctx.save = lambda: []                       # keep benchmarks/results/ untouched
    fns = fc._step_functions()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("engine", "int8", "real"):
            run_step(ctx, name, fns[name], 0)
            assert ctx.payload["steps"][name]["status"] == "ok", ctx.payload["steps"][name]
    finally:
        torch.set_num_threads(threads)
    assert [q for q, _ in built] == [None, "int8", "fp8", None]      # fp16 engine, 8-bit ones, real model
    assert [alive for _, alive in built] == [0, 0, 0, 0], built


def test_a_deadline_inside_llm_step_is_a_timeout(tmp_path):
    """The alarm fires inside llm.step(), in a logits processor: the engine turns an
    Exception there into a failed request (or, elsewhere in the step, an EngineDeadError),
    so the step must see the deadline as a timeout, not an error or a finished request."""
    from benchmarks.first_contact import engine_steps
    from benchmarks.first_contact.common import T0, Context, run_step
    from engine import SamplingParams
    setup = Context(True, time.perf_counter() - T0 + 600, "cpu", None, "fc_test_build", str(tmp_path))
    engine_steps.engine(setup)
    llm = setup.shared["llm"]

    def slow(token_ids, logits):
        time.sleep(0.05)
        return logits

    def stuck(ctx):
        llm.add_request({"prompt_token_ids": [1, 5, 6]},
                        SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, logits_processors=[slow]))
        while llm.has_unfinished_requests():
            llm.step()
        return {}
    ctx = Context(True, time.perf_counter() - T0 + 3, "cpu", None, "fc_test_step_timeout", str(tmp_path))
    ctx.save = lambda: []
    t = time.perf_counter()
    run_step(ctx, "stuck", stuck, need_s=0)
    assert time.perf_counter() - t < 10
    assert ctx.payload["steps"]["stuck"]["status"] == "timeout", ctx.payload["steps"]["stuck"]


def test_every_test_that_needs_cuda_runs_in_the_gpu_check():
    """A test module that skips without CUDA runs nowhere but in the check's tests step."""
    import re

    from benchmarks.first_contact.trace_steps import CUDA_TESTS
    needs_cuda = re.compile(r"DEVICE\s*!=\s*[\"']cuda[\"']|not\s+torch\.cuda\.is_available\(\)")
    tests = os.path.join(REPO, "tests")
    gpu_only = {f"tests/{f}" for f in os.listdir(tests) if f.startswith("test_") and f.endswith(".py")
                and needs_cuda.search(open(os.path.join(tests, f)).read())}
    assert {"tests/test_quantized_weights.py", "tests/test_triton_w8a16.py"} <= gpu_only
    assert gpu_only <= set(CUDA_TESTS), sorted(gpu_only - set(CUDA_TESTS))
    assert len(set(CUDA_TESTS)) == len(CUDA_TESTS) and all(os.path.isfile(os.path.join(REPO, f)) for f in CUDA_TESTS)
    # and they come first: a tests step cut at the deadline has run them
    assert set(CUDA_TESTS[:len(gpu_only)]) == gpu_only


def test_the_expected_step_times_fit_the_deadline():
    """The steps' expected GPU seconds (measured on the H200 where measured, else estimated
    in gpu_first_contact.py) leave a margin of 30 s in the 330 s deadline."""
    from benchmarks import gpu_first_contact as fc
    assert [n for n, _, _ in fc.STEPS] == STEPS
    assert sum(expect for _, _, expect in fc.STEPS) <= fc.DEADLINE_S - 30
