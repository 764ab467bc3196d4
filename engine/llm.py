"""The public entry point: ``LLM``, shaped like vLLM's.

    from engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))

Besides ``generate`` it offers a step-level API for embedding the engine in
an event loop: ``add_request``, ``step``, ``abort`` and ``stream``; and the
per-request primitives of engine/request_api.py (``fork``, ``extend``, ``score``, ...).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Iterator

import torch
from tqdm.auto import tqdm

from engine import request_validation
from engine.core.block_manager import BlockManager
from engine.core.output_processor import OutputProcessor
from engine.core.samples import expand_samples, last_per_request, needs_expansion
from engine.core.scheduler import Scheduler
from engine.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from engine.model.loader import load_model, resolve_model_dir
from engine.request_api import RequestAPI
from engine.sampling.prompt_logprobs import prefill_logprobs, wants_prefill_logprobs
from engine.sampling.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.tokenizer import get_tokenizer
from engine.worker.cuda_graphs import build_decode_runner
from engine.worker.model_runner import ModelRunner


class LLM(RequestAPI):
    """An inference engine over one Llama checkpoint.

    Args:
        model: checkpoint directory (HF layout, safetensors), a Llama ``.gguf`` file
            (converted once into ``$SELFRAG_CACHE/gguf/``), or with
            ``load_format="dummy"`` a config directory or built-in name
            ("selfrag-7b", "selfrag-13b").
        tokenizer: tokenizer directory; default: ``model`` when it holds a
            ``tokenizer.model`` (sentencepiece, preferred) or a ``tokenizer.json``
            (byte-level BPE). Without one, prompts must be token ids.
        skip_tokenizer_init: never load a tokenizer (prompts are token ids).
        dtype: "auto" (fp32 on CPU; the config's dtype on GPU, fp16 where bf16
            is unsupported), "half"/"float16", "bfloat16", "float32".
        device: "auto" (CUDA if present, else CPU), "cpu" or "cuda".
        max_model_len: longest sequence (prompt + output); default and upper
            bound: the config's max_position_embeddings.
        block_size: tokens per KV block (16).
        num_kv_blocks: KV pool size in blocks; overrides the default sizing
            (GPU: ``gpu_memory_utilization`` of device memory; CPU: enough for
            ``max_num_seqs`` full-length sequences, capped at 2 GiB, committed page by
            page as blocks are first written).
        gpu_memory_utilization: fraction of GPU memory the engine may use.
        max_num_seqs: sequences running at once (256).
        max_num_batched_tokens: prompt tokens prefilled per step (default
            max(2048, max_model_len)).
        enable_prefix_caching: share KV blocks of identical prompt prefixes.
        load_format: "auto" (safetensors) or "dummy" (seeded random weights).
        seed: seed of the engine's RNG (dummy weights, unseeded sampling).
        kernel_backend: "auto" (Triton kernels on CUDA, the PyTorch reference
            on CPU), "torch", or "triton" (on CPU: Triton's interpreter, which
            needs TRITON_INTERPRET=1 set before Python starts; slow, for tests).
        download_dir: where to look for an already-downloaded hub snapshot when
            ``model`` is a hub id ("selfrag/selfrag_llama2_7b"); also looked up:
            $HF_HUB_CACHE, $HF_HOME/hub. Nothing is ever downloaded.
        show_progress: progress bar while loading weights.
        speculative_config: speculative decoding, vLLM's keys: ``{"method": "ngram",
            "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}``
            (or ``"method": "custom", "proposer": obj``); output identical to plain
            decoding. See engine/spec_decode/speculator.py.
        quantization: None (the model dtype), "int8": weight-only int8 with
            activations in the model dtype (W8A16), quantized per output channel as
            the ordinary checkpoint loads (engine/model/quantized_weights.py), or "fp8": the
            same with e4m3 weights (sm_89+ GPUs, or CPU); other values (vLLM's "awq",
            "gptq", ...) raise ValueError.
        enforce_eager: never use CUDA graphs. By default, on CUDA with the
            Triton kernels, decode steps replay CUDA graphs captured at start-up
            for batch buckets 1, 2, 4, ... up to max_num_seqs (capture time is
            printed); prefill and CPU always run eagerly.
    """

    def __init__(self, model: str, tokenizer: str | None = None, skip_tokenizer_init: bool = False,
                 dtype: str | torch.dtype = "auto", device: str | None = "auto",
                 max_model_len: int | None = None, block_size: int = 16,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, load_format: str = "auto", seed: int = 0,
                 kernel_backend: str = "auto", download_dir: str | None = None,
                 show_progress: bool = True, enforce_eager: bool = False,
                 speculative_config: dict | None = None, quantization: str | None = None, **unused):
        request_validation.check_vllm_kwargs(unused)
        request_validation.check_engine_args(
            model=model, tokenizer=tokenizer, download_dir=download_dir, max_num_seqs=max_num_seqs,
            block_size=block_size, num_kv_blocks=num_kv_blocks, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens, seed=seed,
            enable_prefix_caching=enable_prefix_caching, skip_tokenizer_init=skip_tokenizer_init,
            show_progress=show_progress, enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization)
        if isinstance(model, str) and model.endswith(".gguf") and os.path.isfile(model):
            from engine.model.gguf.convert import converted_dir
            model = converted_dir(model, progress=show_progress)     # converted once, then cached
        model = resolve_model_dir(model, download_dir) or model
        self.model_dir = model
        # Seconds of each start-up phase, plus what the KV sizing saw (benchmarks read it).
        self.startup: dict = {}
        t_start = time.perf_counter()
        self.model, self.config = load_model(model, dtype=dtype, device=device,
                                             load_format=load_format, seed=seed,
                                             progress=show_progress, kernel_backend=kernel_backend,
                                             quantization=quantization)
        cfg = self.config
        self.startup["load_s"] = time.perf_counter() - t_start
        self.tokenizer = None if skip_tokenizer_init else get_tokenizer(
            tokenizer if tokenizer is not None else model, explicit=tokenizer is not None)

        limit = cfg.max_position_embeddings
        self.max_model_len = limit if max_model_len is None else max_model_len
        if not 1 < self.max_model_len <= limit:
            raise ValueError(f"max_model_len={max_model_len} must be in [2, {limit}] "
                             "(the config's max_position_embeddings)")
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens or max(2048, self.max_model_len)
        t = time.perf_counter()
        num_blocks = num_kv_blocks or self._default_num_blocks(gpu_memory_utilization, show_progress)
        self.startup["kv_sizing_s"] = time.perf_counter() - t
        blocks_per_seq = -(-self.max_model_len // block_size)
        if num_blocks < blocks_per_seq:
            raise ValueError(f"the KV cache ({num_blocks} blocks of {block_size} tokens) cannot hold "
                             f"one sequence of max_model_len={self.max_model_len}; raise "
                             "num_kv_blocks/gpu_memory_utilization or lower max_model_len")
        t = time.perf_counter()
        self.runner = ModelRunner(self.model, block_size, num_blocks)
        self.startup["kv_alloc_s"] = time.perf_counter() - t
        self.startup["num_kv_blocks"] = num_blocks
        # Decode steps: persistent inputs, CUDA graphs where they apply (printed on CUDA).
        t = time.perf_counter()
        cuda = self.model.device.type == "cuda"
        if cuda:
            self.startup["gpu_free_bytes_before_graphs"] = torch.cuda.mem_get_info(self.model.device)[0]
        self.decode_runner = build_decode_runner(self.model, self.runner.kv_caches, block_size,
                                                 max_num_seqs, self.max_model_len, enforce_eager)
        self.startup["decode_runner_s"] = time.perf_counter() - t
        if cuda:
            self.startup["gpu_free_bytes_after_graphs"] = torch.cuda.mem_get_info(self.model.device)[0]
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, self.max_num_batched_tokens)
        self.sampler = Sampler(self.model.device, seed)
        from engine.spec_decode.speculator import Speculator
        self.speculator = Speculator(speculative_config) if speculative_config is not None else None
        self.eos_token_id = (self.tokenizer.eos_token_id if self.tokenizer is not None
                             else _first(cfg.eos_token_id))
        self.sampler.eos_token_id = self.eos_token_id         # min_tokens masks it
        # Async output processing (CUDA): a step's detokenization and stop-string
        # checks run while the device computes the next step; outputs then lag
        # one step. On CPU nothing would overlap, so it is off.
        self._out = OutputProcessor(self.scheduler, async_output=cuda)
        self._requests = self._out.requests        # request id -> RequestState (running)
        # Outputs of add_request()'s requests that generate()/stream() stepped past,
        # returned by the next step() (request id -> latest cumulative output).
        self._held: dict[str, object] = {}
        self._dead: EngineDeadError | None = None
        self._ids = itertools.count()
        # Seconds per phase of step(), summed over all steps (read by the benchmarks):
        # schedule, prepare (the step's device inputs), launch (the forward: a graph
        # replay, or eager kernel launches), sample (queueing the sampler), output
        # (detokenizing, stop checks, outputs), all host work; and wait, the one
        # device-to-host read of the sampled tokens, which waits for the device.
        self.step_times = dict.fromkeys(STEP_PHASES, 0.0)
        self.num_steps = 0

    @property
    def async_output(self) -> bool:
        """Whether a step's text is processed during the next step (default: on CUDA)."""
        return self._out.async_output

    @async_output.setter
    def async_output(self, on: bool) -> None:
        self._out.async_output = bool(on)

    @property
    def cuda_graphs(self) -> dict:
        """Whether decode replays CUDA graphs: ``enabled``, ``reason`` (why not),
        ``buckets``, ``capture_s``, ``error`` (a failed capture's exception)."""
        return dict(self.decode_runner.graph_status)

    def _default_num_blocks(self, util: float, verbose: bool = False) -> int:
        """KV blocks when ``num_kv_blocks`` is not given (see engine/worker/kv_sizing.py).

        CUDA: profile one forward at the largest batch the scheduler can issue,
        then give the cache ``util`` of the device minus what is in use, the
        peak activation and a reserve. CPU: ``max_num_seqs`` full sequences,
        at most 2 GiB (lazily committed: see model_runner.lazy_zeros). Must run
        before the KV pool or CUDA graphs exist.
        """
        from engine.worker import kv_sizing
        per_block = ModelRunner.kv_bytes_per_block(self.config, self.block_size, self.model.dtype)
        if self.model.device.type != "cuda":
            return kv_sizing.cpu_default_blocks(self.max_num_seqs, self.max_model_len,
                                                self.block_size, per_block)
        report = kv_sizing.measure_gpu_memory(self.model, self.max_num_batched_tokens, self.max_num_seqs,
                                              self.max_model_len, self.block_size)
        blocks = kv_sizing.kv_blocks_for_memory(report, util, per_block)
        text = kv_sizing.describe(blocks, self.block_size, per_block, report)
        self.startup["kv_sizing"] = dict(text=text, blocks=blocks, bytes_per_block=per_block,
                                         **dataclasses.asdict(report))
        if verbose:
            import sys
            print(text, file=sys.stderr)
        kv_sizing.check_fits_one_sequence(blocks, self.block_size, self.max_model_len, report,
                                          util, per_block)
        return blocks

    # ---- stepping ------------------------------------------------------------
    def step(self):
        """Runs one scheduler step; returns the ``RequestOutput`` of every
        request that advanced (cumulative; ``finished`` set on the last), led by
        any outputs of this engine's requests that a ``generate``/``stream`` call
        stepped past (nothing is dropped). A request that failed comes back
        finished with ``finish_reason="error"`` and ``.error``; the others go on.
        Raises ``EngineDeadError`` once the engine itself has failed."""
        outs = self._step(finished_only=False)
        if self._held:
            new = {o.request_id for o in outs}
            held = [o for rid, o in self._held.items() if rid not in new]
            self._held.clear()
            outs = held + outs
        return outs

    @property
    def engine_error(self) -> EngineDeadError | None:
        """The error that made this engine unusable (None while it works)."""
        return self._dead

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead

    def _step(self, finished_only: bool):
        self._check_alive()
        # inference_mode skips autograd's version/view bookkeeping on every op,
        # which is a visible share of a small model's step on CPU.
        with torch.inference_mode():
            return self._step_inner(finished_only)

    def _step_inner(self, finished_only: bool):
        t0 = time.perf_counter()
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return self._out.drain(finished_only)   # idle: finish any deferred text
        t1 = time.perf_counter()
        outputs: list = []
        runs = None
        try:
            if is_prefill:
                input_ids, positions, meta, last = self.runner.prepare(seqs, True)
                t2 = time.perf_counter()
                hidden = self.model.forward(input_ids, positions, meta, self.runner.kv_caches)
                if wants_prefill_logprobs(seqs):       # prompt_logprobs, score
                    prefill_logprobs(self, seqs, hidden, meta.host_query_start_loc)
                logits = self.model.compute_logits(hidden[last])
                if needs_expansion(seqs):             # n > 1: the samples fork off here
                    seqs, logits = expand_samples(self, seqs, logits)
            elif self.speculator is not None and (drafts := self.speculator.plan(self, seqs)):
                # a verify step (engine/spec_decode/speculator.py): eager, through the prefill path
                runs, failed = self.speculator.verify(self, seqs, drafts)
                if self._out.async_output:
                    outputs = self._out.drain(finished_only)
            else:
                step = self.decode_runner.prepare(seqs)
                t2 = time.perf_counter()
                logits = self.decode_runner.launch(step)
            if runs is None:
                t3 = time.perf_counter()
                pending = self.sampler.launch(logits, seqs, self.model.ops)
                t4 = time.perf_counter()
                # While the device runs this step, finish the previous step's text.
                if self._out.async_output:
                    outputs = self._out.drain(finished_only)
                t5 = time.perf_counter()
                tokens, lps, failed = pending.wait()    # the step's one device->host read
        except Exception as e:
            # The engine's own failure (a device error, a bug): its state can no longer
            # be trusted, so every later call says so. (A request's own failure never
            # gets here: see OutputProcessor.fail.)
            self._dead = EngineDeadError(f"the engine failed in a step ({type(e).__name__}: {e}); "
                                         "it cannot be used any more: build a new LLM")
            raise self._dead from e
        except BaseException:
            # Interrupted (KeyboardInterrupt): nothing was appended, so the batch is put
            # back to be recomputed, and text already finished is kept for step().
            self._held.update((o.request_id, o) for o in outputs)
            self.scheduler.requeue(seqs)
            raise
        if runs is not None:
            return self._finish_verify(seqs, runs, failed, finished_only, outputs, t0, t1)
        t6 = time.perf_counter()
        self._out.process(seqs, tokens, lps, failed, finished_only, outputs)
        if self.speculator is not None:
            self.speculator.forget_finished(seqs)
        t7 = time.perf_counter()
        outputs = last_per_request(outputs)          # several samples of one request advanced
        st = self.step_times
        st["schedule"] += t1 - t0
        st["prepare"] += t2 - t1
        st["launch"] += t3 - t2
        st["sample"] += t4 - t3
        st["wait"] += t6 - t5
        st["output"] += (t5 - t4) + (t7 - t6)
        self.num_steps += 1
        return outputs

    def _finish_verify(self, seqs, runs, failed, finished_only: bool, outputs: list, t0: float, t1: float):
        """A verify step's outputs: each sequence appends its run of accepted tokens plus
        the bonus (engine/spec_decode/speculator.py)."""
        t2 = time.perf_counter()
        self._out.process_runs(seqs, runs, failed, finished_only, outputs, self.block_manager)
        self.speculator.forget_finished(seqs)
        self.step_times["schedule"] += t1 - t0
        self.step_times["launch"] += t2 - t1
        self.step_times["output"] += time.perf_counter() - t2
        self.num_steps += 1
        return last_per_request(outputs)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False):
        """Generates for one conversation ([{"role", "content"}, ...]) or a list of them,
        rendered by the checkpoint's chat template (tokenizer_config.json's
        ``chat_template`` or ``chat_template.jinja``; ``chat_template`` overrides it) as HF's
        ``apply_chat_template`` does. Returns ``RequestOutput``s in input order, as vLLM's
        ``LLM.chat``. A model without a template (the Self-RAG checkpoints) is refused: give
        ``generate`` its own prompt format (``selfrag.prompts.format_prompt``)."""
        from engine.tokenizer.chat_template import ChatTemplateError, conversation_prompts, load_chat_template
        if self.tokenizer is None:
            raise ValueError("LLM.chat needs a tokenizer; this engine was built without one")
        template = chat_template or (load_chat_template(self.model_dir)
                                     if isinstance(self.model_dir, str) else None)
        if template is None:
            raise ValueError(f"{self.model_dir}: no chat_template (tokenizer_config.json or "
                             "chat_template.jinja); pass chat_template=..., or use generate() with "
                             "the model's own prompt format")
        try:
            prompts = conversation_prompts(self.tokenizer, template, messages, add_generation_prompt,
                                           continue_final_message)
        except ChatTemplateError as e:
            raise ValueError(f"messages: {e}") from None
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True):
        """Generates for one prompt or a list; returns ``RequestOutput``s in input order.

        prompts: a str, a list of str, or ``{"prompt_token_ids": [...]}`` dicts.
        sampling_params: one SamplingParams for all, or a list (one per prompt).
        Every request is validated before any is queued. A request that fails
        comes back finished with ``finish_reason="error"`` and ``.error`` (no
        exception). Requests added with ``add_request`` advance too; their
        outputs are kept for the next ``step()``.
        """
        self._check_alive()
        if prompts is None:
            raise InvalidRequestError("prompts is None: pass a str, a list of str or of "
                                      "{'prompt_token_ids': [...]} dicts")
        if isinstance(prompts, (str, dict)) or not hasattr(prompts, "__iter__"):
            prompts = [prompts]                 # one prompt (a bad one is refused below)
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise InvalidRequestError(f"{len(sampling_params)} SamplingParams for "
                                          f"{len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        reqs = [self.prepare_request(p, sp) for p, sp in zip(prompts, params)]
        ids = [self.enqueue_request(r) for r in reqs]
        results, wanted = {}, set(ids)
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm)
        try:
            while len(results) < len(ids):
                if not self.scheduler.has_unfinished():
                    lost = [i for i in ids if i not in results]
                    raise RuntimeError(f"requests {lost} were aborted during generate()")
                for out in self._step(finished_only=True):
                    if out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
                    else:
                        self._held[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text deltas of one request as they are generated; their
        concatenation is the final text (a tail that may still turn out to be a
        stop string is held back until it is known not to be).

        Raises ``RequestFailedError`` if the request fails. Other queued requests
        advance too; their outputs are kept for the next ``step()``.
        """
        req = self.prepare_request(prompt, params)
        rid = self.enqueue_request(req)
        sent = 0
        try:
            while True:
                for out in self._step(finished_only=False):
                    if out.request_id != rid:
                        self._held[out.request_id] = out
                        continue
                    if out.error is not None:
                        raise RequestFailedError(out.error)
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
        finally:
            self.abort(rid)


STEP_PHASES = ("schedule", "prepare", "launch", "sample", "wait", "output")

def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x
