"""Runs one scheduled step on the device: every kind of execution in one place.

``Executor.execute(batch)`` takes the scheduler's ``SchedulerOutput`` and queues the step:

* **prefill**: a graph replay at the step's token bucket (engine/worker/prefill_graphs.py),
  or eagerly the packed forward over the new positions (``ModelRunner.prepare``) and the
  prompt log-probs some sequences asked for; then the block copies the step's ``n > 1``
  samples need (after the forward wrote the blocks), the last position's logits of each
  sequence (repeated for the samples), and the sampler;
* **decode**: the persistent inputs and a CUDA graph replay, or an eager forward
  (engine/worker/cuda_graphs.py), then the sampler;
* **verify**: the decode runner's forward over each sequence's last token and its drafts
  (a graph replay per (bucket, 1 + k) on CUDA), then the speculator's picks
  (engine/spec_decode/speculator.py).

It returns a ``PendingStep`` at once (the device may still be computing); ``wait()`` is
the step's one device-to-host read and gives the ``ModelRunnerOutput``. The engine core
processes the previous step's text between the two. The host seconds of each phase are
added to ``step_times`` (prepare, launch, sample).
"""
from __future__ import annotations

import time

import torch

from engine.outputs import StepLogprobs
from engine.sampling.prompt_logprobs import prefill_logprobs, wants_prefill_logprobs


class ModelRunnerOutput:
    """What a step produced, on the host. ``tokens`` / ``logprobs``: one per sampled
    sequence (``SchedulerOutput.sampled``), ``failed``: row -> why (a logits processor
    failed, or the row was NaN or fully masked). A verify step has ``runs`` instead: per
    sequence (accepted tokens and the bonus, their log-probs, drafted, accepted).
    ``prompt_logprobs``: sequence index -> its request's ``prompt_logprobs``."""

    __slots__ = ("tokens", "logprobs", "failed", "runs", "prompt_logprobs")   # one a step: kept cheap

    def __init__(self, tokens: list[int], logprobs: list[StepLogprobs], failed: dict[int, str],
                 runs: list | None = None, prompt_logprobs: dict[int, list] | None = None):
        self.tokens, self.logprobs, self.failed, self.runs = tokens, logprobs, failed, runs
        self.prompt_logprobs = prompt_logprobs

class PendingStep:
    """A queued step; ``wait()`` reads its results back (once)."""

    __slots__ = ("_sample", "_result", "_prompt_logprobs")

    def __init__(self, sample=None, result: ModelRunnerOutput | None = None,
                 prompt_logprobs: dict | None = None):
        self._sample, self._result, self._prompt_logprobs = sample, result, prompt_logprobs

    def wait(self) -> ModelRunnerOutput:
        if self._result is None:
            tokens, lps, failed = self._sample.wait()
            self._result = ModelRunnerOutput(tokens, lps, failed, prompt_logprobs=self._prompt_logprobs)
        return self._result


class Executor:
    """The model, its KV cache (``runner``), the decode runner (graphs or eager) and the
    sampler, driven one ``SchedulerOutput`` at a time."""

    def __init__(self, model, runner, decode_runner, sampler, tokenizer, step_times: dict,
                 prefill_runner=None):
        self.model, self.runner, self.decode_runner = model, runner, decode_runner
        self.prefill_runner = prefill_runner          # prefill graphs (None: always eager)
        self.sampler, self.tokenizer = sampler, tokenizer
        self.step_times = step_times

    def execute(self, batch, speculator=None, sources: dict | None = None, keep_sampled: bool = False
                ) -> PendingStep:
        """Queues ``batch`` (a verify step when it has drafts: ``speculator`` runs it).
        Async scheduling: ``sources`` (seq_id -> row of the last step's sampled ids) for
        decode inputs still on the device; ``keep_sampled`` copies this step's sampled ids
        where the next step gathers them, and queues the read-back behind this step."""
        t1 = time.perf_counter()
        extra = None
        if batch.is_prefill:
            pr, bucket = self.prefill_runner, None
            if pr is not None and not wants_prefill_logprobs(batch.seqs):
                bucket = pr.bucket_for(batch.seqs)
            if bucket is not None:
                t2 = time.perf_counter()
                logits = pr.launch(batch.seqs, bucket)          # staged and replayed
            else:
                input_ids, positions, meta, last = self.runner.prepare(batch.seqs, True)
                t2 = time.perf_counter()
                hidden = self.model.forward(input_ids, positions, meta, self.runner.kv_caches)
                if wants_prefill_logprobs(batch.seqs):         # prompt_logprobs, score
                    extra = prefill_logprobs(self.model, self.tokenizer, batch.seqs, hidden,
                                             meta.host_query_start_loc)
                logits = self.model.compute_logits(hidden[last])
            self.runner.copy_blocks(batch.block_copies)         # the samples' partial blocks
            if batch.sample_rows is not None:                   # n > 1: samples share a row
                logits = logits.index_select(0, torch.tensor(batch.sample_rows, device=logits.device))
        else:   # decode, or verify with drafts: logits of the rows that are not padding
            step = self.decode_runner.prepare(batch.seqs, batch.drafts, sources)
            t2 = time.perf_counter()
            logits = self.decode_runner.launch(step)
        t3 = time.perf_counter()
        if batch.drafts:
            runs, failed = speculator.verify(self, batch.seqs, batch.drafts, logits)
            pending = PendingStep(result=ModelRunnerOutput([], [], failed, runs))
        elif keep_sampled:      # a decode step queued ahead: inputs maybe pending, grammars from tables
            sample = self.sampler.launch(logits, batch.sampled, self.model.ops,
                                         grammar_inputs=self.decode_runner.input_ids(step))
            self.decode_runner.keep_sampled(sample.tokens)
            sample.start_copy()
            pending = PendingStep(sample)
        else:
            pending = PendingStep(self.sampler.launch(logits, batch.sampled, self.model.ops), prompt_logprobs=extra)
        st = self.step_times
        st["prepare"] += t2 - t1
        st["launch"] += t3 - t2
        st["sample"] += time.perf_counter() - t3
        return pending
