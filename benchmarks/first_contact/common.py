"""What every first-contact step shares: the deadline, the results file, the log,
device timing and the step runner.

The run has a hard internal deadline (330 s by default, inside the 400 s of the
`timeout` around it and the device tool's 420). Before a step starts, the runner
checks that its estimated need fits what is left and skips it otherwise; a step
also gets a soft alarm at what is left, so one that hangs in Python code is
stopped and recorded. After every step the whole JSON is rewritten, to $OUT and
benchmarks/results/, so a kill at any moment loses at most the step in flight.
"""
from __future__ import annotations

import gc
import os
import signal
import statistics
import sys
import time
import traceback

from benchmarks import device_timing
from benchmarks.common import RESULTS, record

T0 = time.perf_counter()            # the deadline counts from the script's start


class StepTimeout(BaseException):
    """A step ran past its share of the deadline (the soft alarm). A BaseException, as
    KeyboardInterrupt is: the alarm can fire anywhere, and the engine turns any Exception
    inside ``llm.step()`` into an ``EngineDeadError`` (or a failed request, inside a logits
    processor or the detokenizer), which would have been recorded as "error"."""


class Context:
    """One first-contact run: options, budget, results, log, and state the steps share."""

    def __init__(self, dry: bool, deadline_s: float, device: str, out_dir: str | None,
                 name: str, log_dir: str):
        self.dry, self.deadline_s, self.device = dry, deadline_s, device
        self.cuda = device == "cuda"
        self.out_dir = out_dir
        self.name = name                               # results file name (no extension)
        self.log_dir = log_dir                         # where the log / profile / PNG go
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, "first_contact.log")
        self._log = open(self.log_path, "a", buffering=1)
        self.payload = record(deadline_s=deadline_s, dry_run=dry, steps={}, order=[])
        self.shared: dict = {}                         # llm, copy bandwidth, ... across steps

    # ---- budget and output -------------------------------------------------------
    def left(self) -> float:
        return self.deadline_s - (time.perf_counter() - T0)

    def log(self, msg: str) -> None:
        line = f"[{time.perf_counter() - T0:6.1f}s] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")

    def save(self) -> list[str]:
        import json
        self.payload["elapsed_s"] = round(time.perf_counter() - T0, 1)
        paths = []
        folders = [RESULTS] + ([self.out_dir] if self.out_dir else [])
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, self.name + ".json")
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.payload, f, indent=2, default=str)
            os.replace(tmp, path)                      # never a half-written file
            paths.append(path)
        return paths

    def artifact(self, filename: str) -> str:
        """Path of an extra file (profile, PNG, test log): $OUT when set, else the log dir."""
        return os.path.join(self.out_dir or self.log_dir, filename)

    # ---- timing (benchmarks/device_timing.py) -------------------------------------
    def time_graphed(self, fns: list, reps: int = 20) -> list[float]:
        """Seconds per call of ``fns`` as a decode step runs them: back to back in one CUDA
        graph, replays timed with events. Give each fn its own inputs, together more than
        4x the L2 (``device_timing.rotating_copies``), so that replays stream from memory."""
        return device_timing.time_graphed(fns, self.device, reps)

    def sync(self) -> None:
        device_timing.sync(self.device)

    def time_device(self, fn, reps: int = 20, warmup: int = 3) -> list[float]:
        """Seconds of each call of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
        return device_timing.time_calls(fn, self.device, reps, warmup)

    # ---- engines -----------------------------------------------------------------
    def release_engine(self) -> None:
        """Drops the shared engine (its KV pool holds most of the GPU) and returns its
        memory to the driver. A step that holds an engine in a local drops it first."""
        self.shared.pop("llm", None)
        gc.collect()                                   # what only the cycle collector frees
        if self.cuda:
            import torch
            torch.cuda.empty_cache()

    def new_engine(self, model, **kw):
        """An ``engine.LLM``, built only after every earlier engine is gone: each sizes its
        KV pool from the memory free at its start, so an engine left alive (132.5 GB on the
        H200) leaves the next one 0 blocks. The caller must hold no engine itself."""
        from engine import LLM
        self.release_engine()
        return LLM(model, **kw)


def summary(xs: list[float], scale: float = 1.0) -> dict:
    """median / p90 / min / n of a list of seconds (times ``scale``)."""
    if not xs:
        return dict(n=0)
    s = sorted(xs)
    return dict(median=statistics.median(s) * scale, p90=s[min(len(s) - 1, int(0.9 * len(s)))] * scale,
                min=s[0] * scale, n=len(s))


def compiled_variants() -> int:
    """Compiled Triton kernel variants cached so far (0 in the interpreter)."""
    from kernels.triton.common import compiled_variant_count
    return compiled_variant_count()


def _alarm(signum, frame):
    raise StepTimeout("the step ran past the run's deadline")


def run_step(ctx: Context, name: str, fn, need_s: float) -> None:
    """Runs one step under the deadline; records ok / failed (a check did not hold) /
    error (it raised) / timeout / skipped, and saves."""
    ctx.payload["order"].append(name)
    entry = ctx.payload["steps"][name] = dict(status="running", need_s=need_s)
    left = ctx.left()
    if left < need_s:
        entry.update(status="skipped", reason=f"{left:.0f} s left, the step needs ~{need_s:.0f} s")
        ctx.log(f"== {name}: skipped ({entry['reason']})")
        ctx.save()
        return
    ctx.log(f"== {name} ({left:.0f} s left)")
    t = time.perf_counter()
    c0 = compiled_variants()
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(left - 2)))
    try:
        entry["result"] = res = fn(ctx)
        # "failed": the step ran, and a check in it did not hold
        entry["status"] = "failed" if isinstance(res, dict) and res.get("failures") else "ok"
    except StepTimeout as e:
        entry.update(status="timeout", error=str(e))
    except Exception as e:  # noqa: BLE001 - record it, go on with the next step
        entry.update(status="error", error=f"{type(e).__name__}: {str(e)[:1500]}",
                     traceback=traceback.format_exc()[-3000:])
    finally:
        if use_alarm:
            signal.alarm(0)
    entry["seconds"] = round(time.perf_counter() - t, 2)
    entry["compiles"] = compiled_variants() - c0
    ctx.log(f"   {name}: {entry['status']} in {entry['seconds']:.1f} s"
            + (f" -- {entry['error']}" if "error" in entry else ""))
    if entry["status"] == "error":
        print(entry["traceback"], file=sys.stderr, flush=True)
    ctx.save()
