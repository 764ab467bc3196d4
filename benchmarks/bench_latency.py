"""Latency, batch sweep and throughput of the engine against the memory-bandwidth
ceiling and against Hugging Face ``generate``: one run, one device, one JSON.

Stages (``--stages``, default all; the copy bandwidth is always measured):

  copy        device-to-device copy bandwidth of a fp16 buffer (GPU: 1 GiB,
              median of 10, read + write counted): the ceiling's denominator;
  latency     batch 1, prompt 128, 256 new tokens (ignore_eos), dummy weights
              of the selfrag-7b shape in fp16. Step API: TTFT = add_request ->
              the step that returns the first token; TPOT = mean time per
              token after the first; decode tokens/s = 1 / TPOT; bandwidth
              fraction = (bytes read per decode step / TPOT) / copy bandwidth,
              where bytes = llm.model.num_bytes() (every weight, embedding
              table included) + the KV cache read at the mean context; and the
              engine's host time per decode step (schedule + prepare + launch +
              sample + output from llm.step_times; device time excluded);
              TTFT is read from the engine's generated-token count and every
              timed run follows a warm-up at its exact shapes with other tokens;
  sweep       batch 1, 4, 16, 64, 256 at prompt 128, 128 new tokens: per-token
              latency (mean decode step) and tokens/s, next to the ceiling
              b x copy bandwidth / weight bytes (and the same with KV reads);
  throughput  256 requests, seeded random prompt and output lengths in
              [100, 1024], ignore_eos, all arriving at once (llm.generate):
              output tokens/s;
  hf          transformers LlamaForCausalLM on the same device with the very
              same weights (copied from the engine, no checkpoint written) and
              the same prompts: greedy generate(min_new_tokens=max_new_tokens)
              at batch 1 (TTFT = generate of 1 token; TPOT from the full run),
              the throughput workload in left-padded batches, and the static
              cache + torch.compile (cache_implementation="static") at batch 1;
              errors are recorded, not raised. Ratios: speedup_vs_hf.
  quantized   only with ``--quantization int8|fp8`` (benchmarks/latency_quantized.py):
              decode at batch 1 and 16 on the run's engine, then on an 8-bit engine of
              the same dummy weights; tok/s, effective bandwidth, the 8-bit speedup.

Profiles: CUDA present -> the 7B shape in fp16 (the sizes above); no CUDA ->
the embedded default model's shape in fp32 on CPU (``--quick``: smaller);
``--dry-run`` -> a tiny config on CPU, a few tokens (the same code paths).
``--max-seconds`` (default 540) is a budget: parts that would not fit are
shrunk or skipped with a note, and the JSON is rewritten after every stage.

Writes benchmarks/results/latency_<device>.json (``--quick``: ..._quick.json,
``--dry-run``: latency_dryrun.json; also into $OUT when set) and a PNG of
tokens/s against batch size with the bandwidth ceiling (beside the JSON; for
``--quick``/``--dry-run`` into $OUT or the temp dir, as git ignores only their JSON).

The code, by concern: benchmarks/latency_roofline.py (bytes per decode step, copy
bandwidth, bandwidth fraction, ceiling), benchmarks/latency_engine.py (the latency,
sweep and throughput stages over the step API), benchmarks/latency_hf.py (the HF
peer), benchmarks/latency_quantized.py (the quantized stage), benchmarks/latency_plot.py
(the PNG); this file: the command line, the profiles, and the run from stage to stage.

    python benchmarks/bench_latency.py [--quick | --dry-run] [--stages latency,sweep,throughput,hf]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

_T0 = time.perf_counter()      # the budget starts before torch is imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import device_name, record, slug, write_json  # noqa: E402
from benchmarks.latency_engine import (  # noqa: E402
    rand_prompts,
    run_steps,
    stage_latency,
    stage_sweep,
    stage_throughput,
    syncer,
    throughput_workload as throughput_workload,  # re-exported: the tests read it here
)
from benchmarks.latency_hf import stage_hf  # noqa: E402
from benchmarks.latency_plot import plot  # noqa: E402
from benchmarks.latency_roofline import (  # noqa: E402
    bandwidth_fraction as bandwidth_fraction,  # re-exported, as the next line's: the tests
    ceiling_tokens_per_s as ceiling_tokens_per_s,  # read the arithmetic here
    copy_bandwidth,
    decode_bytes_per_step,
    kv_bytes_per_token,
)

STAGES = ("latency", "sweep", "throughput", "hf", "quantized")   # quantized: only with --quantization

# A tiny GQA config for the dry run (CPU, fp32).
DRY_CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, model_type="llama")

# Settings per profile. copy_mib: the copy buffer; tp_*: the throughput workload;
# hf_batch: HF's padded batch size; need: seconds a stage needs at least to be
# started (the budget check); static_need: same for HF's static-cache compile.
PROFILES = {
    "gpu": dict(model="selfrag-7b", device="cuda", dtype="float16", copy_mib=1024, copy_repeat=10,
                prompt_len=128, output_len=256, batch_sizes=[1, 4, 16, 64, 256], sweep_output_len=128,
                num_requests=256, tp_in=(100, 1024), tp_out=(100, 1024), hf_batch=32,
                hf_requests=256, need=dict(latency=20, sweep=30, throughput=40, hf=45, quantized=60),
                static_need=150),
    "gpu_quick": dict(model="selfrag-7b", device="cuda", dtype="float16", copy_mib=1024, copy_repeat=5,
                      prompt_len=128, output_len=128, batch_sizes=[1, 4, 16, 64, 256],
                      sweep_output_len=32, num_requests=64, tp_in=(100, 1024), tp_out=(100, 512),
                      hf_batch=32, hf_requests=32, need=dict(latency=20, sweep=30, throughput=30, hf=45, quantized=60),
                      static_need=150),
    "cpu": dict(model="default", device="cpu", dtype="float32", copy_mib=256, copy_repeat=7,
                prompt_len=128, output_len=64, batch_sizes=[1, 4, 16, 64], sweep_output_len=32,
                num_requests=32, tp_in=(16, 256), tp_out=(16, 128), hf_batch=8, hf_requests=32,
                need=dict(latency=5, sweep=10, throughput=10, hf=15, quantized=10), static_need=15),
    "quick": dict(model="default", device="cpu", dtype="float32", copy_mib=64, copy_repeat=5,
                  prompt_len=64, output_len=32, batch_sizes=[1, 4, 16], sweep_output_len=16,
                  num_requests=16, tp_in=(16, 128), tp_out=(8, 64), hf_batch=8, hf_requests=16,
                  need=dict(latency=2, sweep=5, throughput=5, hf=5, quantized=5), static_need=5),
    "dry": dict(model="dry", device="cpu", dtype="float32", copy_mib=8, copy_repeat=3,
                prompt_len=16, output_len=8, batch_sizes=[1, 4, 16], sweep_output_len=4,
                num_requests=8, tp_in=(8, 32), tp_out=(4, 16), hf_batch=4, hf_requests=8,
                need=dict(latency=1, sweep=1, throughput=1, hf=1, quantized=1), static_need=1),
}



class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = _T0, seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)



def model_dir(name: str, tmp: str) -> str:
    if name == "dry":
        path = os.path.join(tmp, "latency-dry-model")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(DRY_CONFIG, f)
        return path
    if name == "default":
        from selfrag.default_model import default_model_dir
        return default_model_dir()
    return name


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The flags, and the selected stages (``quantized`` added by --quantization)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny config on CPU, a few tokens")
    ap.add_argument("--quick", action="store_true", help="smaller everything")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--stages", default=",".join(STAGES[:-1]), help=f"subset of {','.join(STAGES)}")
    ap.add_argument("--quantization", choices=["int8", "fp8"], default=None,
                    help="add the quantized stage: 8-bit weights vs the model dtype at batch 1 and 16, same run")
    ap.add_argument("--max-seconds", type=float, default=540.0,
                    help="budget: later parts are shrunk or skipped rather than overrun it")
    ap.add_argument("--model", help="config dir or built-in name (default per profile)")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--output-len", type=int)
    ap.add_argument("--batch-sizes", help="sweep batch sizes, e.g. 1,4,16,64,256")
    ap.add_argument("--sweep-output-len", type=int)
    ap.add_argument("--num-requests", type=int, help="throughput workload size")
    ap.add_argument("--hf-requests", type=int, help="throughput requests HF runs (<= num-requests)")
    ap.add_argument("--hf-batch-size", type=int)
    ap.add_argument("--skip-hf-static", action="store_true",
                    help="no HF static cache + torch.compile run (minutes of compiling on a GPU)")
    ap.add_argument("--out", help="JSON file name in benchmarks/results, or an absolute path "
                                  "(default latency_<device>.json)")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if args.quantization and "quantized" not in stages:
        stages.append("quantized")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    return args, stages


def settings(args) -> tuple[str, dict]:
    """The profile the flags and the device pick, and its settings with the flags' overrides."""
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.dry_run:
        prof = "dry"
    elif cuda:
        prof = "gpu_quick" if args.quick else "gpu"
    else:
        prof = "quick" if args.quick else "cpu"
    P = dict(PROFILES[prof])
    for key, val in (("model", args.model), ("prompt_len", args.prompt_len),
                     ("output_len", args.output_len), ("sweep_output_len", args.sweep_output_len),
                     ("num_requests", args.num_requests), ("hf_requests", args.hf_requests),
                     ("hf_batch", args.hf_batch_size)):
        if val is not None:
            P[key] = val
    P["skip_hf_static"] = args.skip_hf_static
    if args.batch_sizes:
        P["batch_sizes"] = [int(b) for b in args.batch_sizes.split(",")]
    return prof, P


def output_name(args, dname: str) -> str:
    """--out, or the JSON's default name for the device and profile."""
    if args.out:
        return args.out
    if args.dry_run:
        return "latency_dryrun.json"
    return f"latency_{slug(dname)}{'_quick' if args.quick else ''}.json"


def build_engine(P: dict, tmp: str):
    """Checks that the workload fits the model, measures the copy bandwidth, then builds the
    engine. Returns build(quantization) -> a new engine, the engine, its build seconds and
    the copy bandwidth."""
    from engine import LLM
    dev = P["device"]
    mdir = model_dir(P["model"], tmp)
    need_len = max(P["prompt_len"] + P["output_len"], P["prompt_len"] + P["sweep_output_len"],
                   P["tp_in"][1] + P["tp_out"][1])
    from engine.model.config import ModelConfig
    limit = ModelConfig.from_pretrained(mdir).max_position_embeddings
    if need_len > limit:
        sys.exit(f"the workload needs {need_len} positions; the model has {limit}")
    max_seqs = max(256, max(P["batch_sizes"]))
    # Before the engine: its KV pool takes 90% of the GPU's memory.
    copy = copy_bandwidth(dev, P["copy_mib"], P["copy_repeat"])
    if dev == "cuda":
        torch.cuda.empty_cache()
    def build(quantization=None):
        return LLM(mdir, load_format="dummy", dtype=P["dtype"], device=dev, max_model_len=need_len,
                   max_num_seqs=max_seqs, skip_tokenizer_init=True, show_progress=False,
                   quantization=quantization)
    t = time.perf_counter()
    llm = build()
    build_s = time.perf_counter() - t
    return build, llm, build_s, copy


def start_payload(llm, P: dict, prof: str, args, stages: list[str], dname: str, copy: dict,
                  build_s: float) -> dict:
    """Prints the run's head; the JSON's (model, bytes, copy bandwidth), with no records yet."""
    cfg = llm.config
    dtype = str(llm.model.dtype).replace("torch.", "")
    W = llm.model.num_bytes()
    kvt = kv_bytes_per_token(cfg, llm.model.dtype.itemsize)
    embed_bytes = llm.model.embed.numel() * llm.model.embed.element_size()
    print(f"model {P['model']} ({cfg.num_params() / 1e9:.3f} B params, {W / 1e9:.3f} GB {dtype}) on "
          f"{dname}; built in {build_s:.1f} s; profile {prof}; budget {args.max_seconds:.0f} s",
          flush=True)
    print(f"  copy bandwidth: {copy['copy_gb_per_s']:.1f} GB/s (read + write, "
          f"{copy['buffer_bytes'] / 2**20:.0f} MiB buffer)", flush=True)
    base = dict(device=dname, dtype=dtype, model=P["model"])
    return record(device=dname, dtype=dtype, model=P["model"], profile=prof,
                  torch_version=torch.__version__, stages=stages, budget_s=args.max_seconds,
                  settings={k: v for k, v in P.items() if k != "need"},
                  weight_bytes=W, embed_bytes=embed_bytes, kv_bytes_per_token=kvt,
                  engine_build_s=build_s,
                  cuda_graphs=llm.cuda_graphs,
                  copy=record(**base, batch_size=None, prompt_len=None, output_len=None,
                              stage="copy", **copy),
                  records=[], notes=[], errors={})


def reserve_after(stage: str, stages: list[str], P: dict) -> float:
    """Seconds the later selected stages need at least (kept free by earlier ones)."""
    later = STAGES[STAGES.index(stage) + 1:]
    return sum(P["need"][s] for s in later if s in stages)


def run_stages(holder: dict, build, P: dict, stages: list[str], quantization, budget: Budget, sync,
               payload: dict, save):
    """The selected stages in STAGES' order on holder["llm"] (the engine's only reference: the hf and
    quantized stages free it), each skipped with a note when the budget no longer fits it; their
    records, notes, errors and seconds into ``payload``, saved after every stage."""
    recs = payload["records"]
    base = dict(device=payload["device"], dtype=payload["dtype"], model=payload["model"])
    bw, W, kvt = payload["copy"]["copy_bytes_per_s"], payload["weight_bytes"], payload["kv_bytes_per_token"]
    vocab = holder["llm"].config.vocab_size
    eng_lat = eng_tp = None
    prompt, eng_tokens = None, []
    for st in STAGES:
        if st not in stages:
            continue
        if budget.left() < P["need"][st]:
            payload["notes"].append(f"{st} skipped: {budget.left():.0f} s left, needs ~{P['need'][st]} s")
            print("  " + payload["notes"][-1], flush=True)
            continue
        t = time.perf_counter()
        try:
            if st == "latency":
                eng_lat, prompt, eng_tokens = stage_latency(holder["llm"], P, base, bw, W, kvt, sync)
                recs.append(eng_lat)
                print(f"  latency batch 1: TTFT {eng_lat['ttft_ms']:.1f} ms, TPOT {eng_lat['tpot_ms']:.2f} ms "
                      f"({eng_lat['decode_tokens_per_s']:.1f} tok/s), bandwidth fraction "
                      f"{eng_lat['bandwidth_fraction']:.3f}, host {eng_lat['host_ms_per_step']:.2f} ms/step "
                      f"{eng_lat['step_split_ms']}", flush=True)
            elif st == "sweep":
                rows, notes = stage_sweep(holder["llm"], P, base, bw, W, kvt, sync, budget,
                                          reserve_after(st, stages, P))
                recs.extend(rows)
                payload["notes"] += notes
            elif st == "throughput":
                est = max((r["output_tokens_per_s"] for r in recs if r.get("stage") == "sweep"),
                          default=None)
                eng_tp, notes = stage_throughput(holder["llm"], P, base, sync, budget,
                                                 reserve_after(st, stages, P), est)
                recs.append(eng_tp)
                payload["notes"] += notes
            elif st == "hf":
                if prompt is None:
                    prompt = rand_prompts(1, P["prompt_len"], vocab, seed=1)[0]
                def emit(rec):
                    recs.append(rec)
                    save()
                notes, errors = stage_hf(holder, P, base, sync, budget, eng_lat, eng_tp,
                                         prompt, eng_tokens, emit)
                payload["notes"] += notes
                payload["errors"].update(errors)
            elif st == "quantized":
                from benchmarks.latency_quantized import stage_quantized
                recs.extend(stage_quantized(holder, build, quantization or "int8", P, base, bw, kvt, sync,
                                            (run_steps, rand_prompts, decode_bytes_per_step, record)))
        except Exception as e:  # noqa: BLE001  -- record, go on with the next stage
            import traceback
            traceback.print_exc()
            payload["errors"][st] = f"{type(e).__name__}: {str(e)[:2000]}"
            if "llm" not in holder:
                break
        payload.setdefault("stage_seconds", {})[st] = round(time.perf_counter() - t, 1)
        save()


def write_results(payload: dict, save, args, out_name: str, tmp: str) -> None:
    """The notes, the final JSON, and the PNG beside it; a dry or quick run's PNG goes to
    $OUT or the temp dir (git ignores only their JSON)."""
    for n in payload["notes"]:
        print("  note:", n, flush=True)
    paths = save()
    for p in paths:
        print("wrote", p)
    small = args.dry_run or args.quick
    png_dir = (os.environ.get("OUT") or tmp) if small else os.path.dirname(paths[0])
    png = plot(payload, os.path.join(png_dir, os.path.basename(out_name).replace(".json", ".png")))
    if png:
        print("wrote", png)
        if os.environ.get("OUT") and not small:
            shutil.copy(png, os.environ["OUT"])


def main(argv=None):
    args, stages = parse_args(argv)
    budget = Budget(args.max_seconds)
    prof, P = settings(args)
    sync = syncer(P["device"])
    dname = device_name(P["device"])
    out_name = output_name(args, dname)
    tmp = tempfile.mkdtemp(prefix="bench_latency_")
    build, llm, build_s, copy = build_engine(P, tmp)
    payload = start_payload(llm, P, prof, args, stages, dname, copy, build_s)

    def save():
        payload["elapsed_s"] = round(budget.seconds - budget.left(), 1)
        return write_json(out_name, payload) if not os.path.isabs(out_name) else _write_abs(out_name, payload)

    save()
    holder = {"llm": llm}
    del llm
    run_stages(holder, build, P, stages, args.quantization, budget, sync, payload, save)
    write_results(payload, save, args, out_name, tmp)
    return payload


def _write_abs(path: str, payload) -> list[str]:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return [path]


if __name__ == "__main__":
    result = main()
    # A failed engine stage (or the HF stage as a whole) fails the run; the HF
    # sub-runs (e.g. static cache + compile) only record their error.
    sys.exit(1 if any(k in STAGES for k in result["errors"]) else 0)
