"""The engine core: one step is schedule -> execute -> update.

    batch = scheduler.schedule()        SchedulerOutput: a prefill or a decode of some sequences,
                                        then the core plans n > 1 samples / speculative drafts
    pending = executor.execute(batch)   the step queued on the device (engine/worker/executor.py)
    early = outputs.drain()             meanwhile, the previous step's text (async output, CUDA)
    result = pending.wait()             ModelRunnerOutput: the one device-to-host read
    outputs.process(batch, result)      tokens appended, stops checked, RequestOutputs built

**Async scheduling** (``async_scheduling``, default on CUDA): a plain decode step is
queued before the step in flight is read back, so the host's read-back, stop checks and
outputs overlap the device's next forward instead of leaving it idle:

    step k:   schedule N+1 (its sequences' last tokens still on the device: pending)
              execute N+1  (inputs gathered from N's sampled ids on the device)
              wait N, update N  -> the outputs of N (one step behind)

A sequence's pending tokens count in its length (its KV slot is given) but not in its
ids (``Sequence.num_pending``). A request that N finishes (EOS, stop string, stop id,
length, failure) had N+1 queued for nothing: one wasted row, never a wrong token, since
N+1's results for a finished sequence are dropped. The next step runs synchronously
(the one in flight read back first; ``sync_reasons`` counts why) whenever it needs host
state: a prefill (prompts waiting), speculation (drafts come from the tokens), rows
with host-side sampling (logits processors, unless they are grammars offering their
tables, which then run on the device: engine/sampling/logits_processors.py; the sampling
knobs, whose token counts are host-side), held requests, a sequence at max_model_len, or
a step that would preempt.
API calls that change requests (fork, extend, release, score, beam search) first read
the step in flight back (``finish_inflight``).

``EngineCore`` owns the components (the scheduler and its block manager, the executor
with the model, KV cache and sampler, the output processor with the requests) and the
per-request state the decoding primitives work on (engine/core/forking.py, held.py,
n_samples.py). ``LLM`` (engine/llm.py) is the public facade over it.
"""
from __future__ import annotations

import time
from collections import Counter

import torch

from engine.core.n_samples import last_per_request, plan_samples
from engine.core.output_processor import OutputProcessor
from engine.core.scheduler import SchedulerOutput
from engine.errors import EngineDeadError
from engine.sampling.knobs import uses_knobs
from engine.sampling.logits_processors import has_device_grammar

STEP_PHASES = ("schedule", "prepare", "launch", "sample", "wait", "output")


class EngineCore:
    """The engine's state and its step. ``requests``: running requests (id ->
    RequestState); ``held``: finished ones kept for ``extend`` (``SamplingParams.hold``);
    ``undelivered``: outputs that ``generate``/``stream``/``wait`` stepped past, for the next
    ``LLM.step()``; ``step_times``: host seconds per phase of ``step``, summed (the
    benchmarks read them): schedule, prepare (the step's device inputs), launch (the
    forward: a graph replay, or eager kernel launches), sample (queueing the sampler),
    output (text, stop checks, outputs), and wait, the read-back that waits for the device."""

    def __init__(self, scheduler, executor, *, tokenizer, config, max_model_len: int,
                 eos_token_id: int | None, async_output: bool, speculator=None,
                 async_scheduling: bool = False):
        self.scheduler, self.block_manager, self.executor = scheduler, scheduler.block_manager, executor
        self.tokenizer, self.config = tokenizer, config
        self.max_model_len, self.eos_token_id = max_model_len, eos_token_id
        self.speculator = speculator
        self.outputs = OutputProcessor(scheduler, async_output=async_output)
        self.requests = self.outputs.requests
        self.held = self.outputs.held
        self.undelivered: dict = {}
        self.dead: EngineDeadError | None = None
        self.step_times = executor.step_times
        self.num_steps = 0
        self.inflight: tuple | None = None      # (batch, PendingStep) queued, not read back
        self._async = False
        self.async_scheduling = async_scheduling
        self.num_overlapped_steps = 0           # steps queued before the last one was read back
        self.sync_reasons: Counter = Counter()  # async scheduling: why a step ran synchronously

    @property
    def sampler(self):
        return self.executor.sampler

    @property
    def runner(self):
        return self.executor.runner

    @property
    def async_scheduling(self) -> bool:
        return self._async

    @async_scheduling.setter
    def async_scheduling(self, on: bool) -> None:
        self._async = bool(on)
        self.block_manager.counts_pending = self._async or self.inflight is not None

    def check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead

    # ---- the step ------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list:
        """One step; returns the outputs due now (with ``finished_only``, only finished
        requests'). Raises ``EngineDeadError`` once the engine itself has failed."""
        self.check_alive()
        # inference_mode skips autograd's version/view bookkeeping on every op, which is a
        # visible share of a small model's step on CPU.
        with torch.inference_mode():
            if self._async:
                return self._step_async(finished_only)
            t0 = time.perf_counter()
            batch = self.schedule()
            if not batch.seqs:
                return self.outputs.drain(finished_only)     # idle: finish any deferred text
            self.step_times["schedule"] += time.perf_counter() - t0
            result, early = self.execute(batch, finished_only)
            return self.update(batch, result, finished_only, early)

    # ---- async scheduling ---------------------------------------------------------
    def _overlap_blocker(self) -> str | None:
        """Why the next step must wait for the one in flight to be read back (None: it
        can be queued before)."""
        sched = self.scheduler
        if sched.waiting:
            return "prefill"
        if self.speculator is not None:
            return "speculation"
        running = sched.running
        if not running:
            return "idle"
        limit = self.max_model_len
        for seq in running:
            p = seq.params
            if p.hold or uses_knobs(p):
                return "host-side sampling"
            if p.logits_processors and (p.row_logits_processors or not all(
                    has_device_grammar(x) for x in p.batched_logits_processors)):
                return "host-side sampling"       # a grammar's tables run on the device instead
            if len(seq) >= limit:
                return "max_model_len"
        if not self.block_manager.can_append_slots(running):
            return "preemption"
        return None

    def _step_async(self, finished_only: bool) -> list:
        prev = self.inflight
        blocker = self._overlap_blocker()
        if prev is not None and blocker is not None:
            self.sync_reasons[blocker] += 1
            return self.finish_inflight(finished_only)       # the next call schedules
        t0 = time.perf_counter()
        batch = self.schedule()
        if not batch.seqs:
            return self.outputs.drain(finished_only)
        self.step_times["schedule"] += time.perf_counter() - t0
        if blocker is not None:                              # nothing in flight: a plain step
            self.sync_reasons[blocker] += 1
            result, early = self.execute(batch, finished_only)
            return self.update(batch, result, finished_only, early)
        sources = None
        if prev is not None:                                 # inputs still on the device
            rows = {s.seq_id: i for i, s in enumerate(prev[0].sampled)}
            sources = {s.seq_id: rows[s.seq_id] for s in batch.seqs if s.num_pending}
        try:
            pending = self.executor.execute(batch, None, sources, keep_sampled=True)
        except Exception as e:
            self._die(e)
        except BaseException:
            self._abandon(batch)
            raise
        for seq in batch.sampled:
            seq.num_pending += 1
        self.inflight = (batch, pending)
        self.num_overlapped_steps += 1
        if prev is None:
            return self.outputs.drain(finished_only) if self.outputs.async_output else []
        outputs = self._read_back(prev, finished_only)
        if all(s.is_finished for s in batch.sampled):    # every row of the step queued is void:
            outputs += self.finish_inflight(finished_only)  # nothing left to wait for later
        return outputs

    def finish_inflight(self, finished_only: bool = False) -> list:
        """Reads back and processes the step in flight, if any; returns its outputs."""
        prev, self.inflight = self.inflight, None
        if prev is None:
            return []
        with torch.inference_mode():
            return self._read_back(prev, finished_only)

    def _read_back(self, prev: tuple, finished_only: bool) -> list:
        batch, pending = prev
        t = time.perf_counter()
        early = self.outputs.drain(finished_only) if self.outputs.async_output else []
        t2 = time.perf_counter()
        try:
            result = pending.wait()
        except Exception as e:
            self._die(e)
        except BaseException:
            self.undelivered.update((o.request_id, o) for o in early)
            self._abandon(batch)
            raise
        self.step_times["output"] += t2 - t
        self.step_times["wait"] += time.perf_counter() - t2
        return self.update(batch, result, finished_only, early, resolving=True)

    def _abandon(self, batch: SchedulerOutput) -> None:
        """An interruption in an async step: the steps not read back are recomputed (their
        sequences requeued, nothing pending), as a synchronous step's batch would be."""
        seqs = {id(s): s for s in batch.sampled}
        if self.inflight is not None:
            seqs.update((id(s), s) for s in self.inflight[0].sampled)
            self.inflight = None
        live = [s for s in seqs.values() if not s.is_finished]
        for s in live:
            s.num_pending = 0
        self.scheduler.requeue(live)

    def _die(self, e: Exception):
        self.dead = EngineDeadError(f"the engine failed in a step ({type(e).__name__}: {e}); "
                                    "it cannot be used any more: build a new LLM")
        raise self.dead from e

    def schedule(self) -> SchedulerOutput:
        """The scheduler's batch, with the step's ``n > 1`` samples or speculative drafts planned."""
        batch = self.scheduler.schedule()
        if batch.is_prefill:
            plan_samples(self, batch)
        elif self.speculator is not None and batch.seqs:
            batch.drafts = self.speculator.plan(batch.seqs, self.requests, self.block_manager)
        return batch

    def execute(self, batch: SchedulerOutput, finished_only: bool):
        """(the step's results, the outputs of the text processed while the device ran it).
        A failure of the engine's own (a device error, a bug) makes every later call raise
        ``EngineDeadError``; an interruption (KeyboardInterrupt) puts the batch back to be
        recomputed, nothing appended, and keeps the text already finished for ``step()``."""
        early: list = []
        try:
            pending = self.executor.execute(batch, self.speculator)
            t = time.perf_counter()
            if self.outputs.async_output:
                early = self.outputs.drain(finished_only)    # while the device computes
            t2 = time.perf_counter()
            result = pending.wait()
            self.step_times["output"] += t2 - t
            self.step_times["wait"] += time.perf_counter() - t2
        except Exception as e:
            self._die(e)
        except BaseException:
            self.undelivered.update((o.request_id, o) for o in early)
            self.scheduler.requeue(batch.sampled)
            raise
        return result, early

    def update(self, batch: SchedulerOutput, result, finished_only: bool, outputs: list,
               resolving: bool = False) -> list:
        """Appends the step's tokens (a verify step: each sequence's accepted run) to the
        requests, checks stops, and returns the outputs due now, one per request.
        ``resolving``: a step queued ahead, whose tokens were pending (async scheduling)."""
        t = time.perf_counter()
        sampled = batch.sampled
        if result.prompt_logprobs:
            self._set_prompt_logprobs(batch, result.prompt_logprobs)
        if result.runs is not None:
            self.outputs.process_runs(batch.seqs, result.runs, result.failed, finished_only, outputs,
                                      self.block_manager)
        else:
            self.outputs.process(sampled, result.tokens, result.logprobs, result.failed, finished_only, outputs,
                                 resolving=resolving)
        if self.speculator is not None:
            self.speculator.forget_finished(sampled)
        self.step_times["output"] += time.perf_counter() - t
        self.num_steps += 1
        return last_per_request(outputs)          # several samples of one request advanced

    def _set_prompt_logprobs(self, batch: SchedulerOutput, entries_by_index: dict) -> None:
        for i, entries in entries_by_index.items():
            seq = batch.seqs[i]
            seq.logprobs_from = None
            req = self.requests.get(seq.request_id)
            if req is not None:
                for member in req.group.members if req.group is not None else [req]:
                    member.prompt_logprobs = entries
