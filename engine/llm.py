"""The public entry point: ``LLM``, shaped like vLLM's.

    from engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))

Besides ``generate`` it offers a step-level API for embedding the engine in
an event loop: ``add_request``, ``step``, ``abort`` and ``stream``.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Iterator

import torch
from tqdm.auto import tqdm

from engine.block_manager import BlockManager
from engine.cuda_graphs import build_decode_runner
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.model_loader import load_model, resolve_model_dir
from engine.model_runner import ModelRunner
from engine.request_state import RequestState
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence



class LLM:
    """An inference engine over one Llama checkpoint.

    Args:
        model: checkpoint directory (HF layout, safetensors), or with
            ``load_format="dummy"`` a config directory or built-in name
            ("selfrag-7b", "selfrag-13b").
        tokenizer: tokenizer directory; default: ``model`` when it holds a
            ``tokenizer.model``. Without one, prompts must be token ids.
        skip_tokenizer_init: never load a tokenizer (prompts are token ids).
        dtype: "auto" (fp32 on CPU; the config's dtype on GPU, fp16 where bf16
            is unsupported), "half"/"float16", "bfloat16", "float32".
        device: "auto" (CUDA if present, else CPU), "cpu" or "cuda".
        max_model_len: longest sequence (prompt + output); default and upper
            bound: the config's max_position_embeddings.
        block_size: tokens per KV block (16).
        num_kv_blocks: KV pool size in blocks; overrides the default sizing
            (GPU: ``gpu_memory_utilization`` of device memory; CPU: enough for
            ``max_num_seqs`` full-length sequences, capped at 2 GiB).
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
                 show_progress: bool = True, enforce_eager: bool = False, **unused):
        for key in unused:
            if key not in _VLLM_IGNORED:
                raise TypeError(f"LLM() got an unexpected keyword argument {key!r}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {block_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        model = resolve_model_dir(model, download_dir) or model
        self.model_dir = model
        # Seconds of each start-up phase, plus what the KV sizing saw (benchmarks read it).
        self.startup: dict = {}
        t_start = time.perf_counter()
        self.model, self.config = load_model(model, dtype=dtype, device=device,
                                             load_format=load_format, seed=seed,
                                             progress=show_progress, kernel_backend=kernel_backend)
        cfg = self.config
        self.startup["load_s"] = time.perf_counter() - t_start
        self.tokenizer = None
        tok_dir = tokenizer if tokenizer is not None else model
        if not skip_tokenizer_init and os.path.isfile(os.path.join(str(tok_dir), "tokenizer.model")):
            from engine.tokenizer import Tokenizer
            self.tokenizer = Tokenizer.from_pretrained(tok_dir)
        elif tokenizer is not None and not skip_tokenizer_init:
            raise ValueError(f"tokenizer={tokenizer!r}: no tokenizer.model in that directory")

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
        self.eos_token_id = (self.tokenizer.eos_token_id if self.tokenizer is not None
                             else _first(cfg.eos_token_id))
        self._requests: dict[str, RequestState] = {}
        # Async output processing (CUDA): a step's detokenization and stop-string
        # checks run while the device computes the next step; outputs then lag
        # one step. On CPU nothing would overlap, so it is off.
        self.async_output = self.model.device.type == "cuda"
        self._deferred: list[RequestState] = []
        self._ids = itertools.count()
        # Seconds per phase of step(), summed over all steps (read by the benchmarks):
        # schedule, prepare (the step's device inputs), launch (the forward: a graph
        # replay, or eager kernel launches), sample (queueing the sampler), output
        # (detokenizing, stop checks, outputs), all host work; and wait, the one
        # device-to-host read of the sampled tokens, which waits for the device.
        self.step_times = dict.fromkeys(STEP_PHASES, 0.0)
        self.num_steps = 0

    @property
    def cuda_graphs(self) -> dict:
        """Whether decode replays CUDA graphs: ``enabled``, ``reason`` (why not),
        ``buckets``, ``capture_s``, ``error`` (a failed capture's exception)."""
        return dict(self.decode_runner.graph_status)

    def _default_num_blocks(self, util: float, verbose: bool = False) -> int:
        """KV blocks when ``num_kv_blocks`` is not given (see engine/kv_sizing.py).

        CUDA: profile one forward at the largest batch the scheduler can issue,
        then give the cache ``util`` of the device minus what is in use, the
        peak activation and a reserve. CPU: ``max_num_seqs`` full sequences,
        at most 2 GiB. Must run before the KV pool or CUDA graphs exist.
        """
        from engine import kv_sizing
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

    # ---- requests ------------------------------------------------------------
    def get_tokenizer(self):
        return self.tokenizer

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")
            elif "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
            else:
                raise InvalidRequestError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
        elif isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer: pass prompts as "
                                          "{'prompt_token_ids': [...]}")
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            raise InvalidRequestError(f"a prompt must be a str or a dict, got {type(prompt).__name__}")
        vocab = self.config.vocab_size
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt_token_ids must be a list of ints in [0, {vocab})")
        if not ids:
            raise InvalidRequestError("the prompt is empty (no tokens)")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens; with at least one new "
                                     f"token it does not fit max_model_len={self.max_model_len}")
        return text, list(ids)

    def _check_params(self, params) -> SamplingParams:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got "
                                      f"{type(params).__name__}")
        vocab = self.config.vocab_size
        for name in ("stop_token_ids", "logprob_token_ids"):
            bad = [t for t in getattr(params, name) or [] if t >= vocab]
            if bad:
                raise InvalidRequestError(f"SamplingParams.{name} has ids {bad} >= vocab size {vocab}")
        if params.logprobs is not None and params.logprobs > vocab:
            raise InvalidRequestError(f"SamplingParams.logprobs={params.logprobs} > vocab size {vocab}")
        return params

    def prepare_request(self, prompt, params: SamplingParams | None = None,
                        request_id: str | None = None) -> RequestState:
        """Validates and tokenizes one request without queueing it (``add_request``
        is ``enqueue_request(prepare_request(...))``). Touches no engine state, so a
        server can answer a bad request with an error before committing to it.
        Raises ``InvalidRequestError`` (a ValueError)."""
        text, ids = self._prompt_ids(prompt)
        params = self._check_params(params if params is not None else SamplingParams())
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self._requests:
            raise InvalidRequestError(f"request_id {rid!r} is already running")
        seq = Sequence(ids, rid, params)
        return RequestState(seq, text, self.tokenizer, self.eos_token_id, self.max_model_len)

    def enqueue_request(self, req: RequestState) -> str:
        """Queues a request from ``prepare_request``; returns its id."""
        if req.request_id in self._requests:
            raise InvalidRequestError(f"request_id {req.request_id!r} is already running")
        self._requests[req.request_id] = req
        self.scheduler.add(req.seq)
        return req.request_id

    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queues one request; returns its id. Raises ``InvalidRequestError``
        (a ValueError) before queueing anything if the request is invalid."""
        return self.enqueue_request(self.prepare_request(prompt, params, request_id))

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its blocks. False if it is not running."""
        req = self._requests.pop(str(request_id), None)
        if req is None:
            return False
        self.scheduler.finish(req.seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_generated_tokens(self, request_id: str) -> int | None:
        """Tokens sampled so far for a running request (None if it is not running).

        Counts at once, also when async output processing delays the request's
        text to the next step: a benchmark reads time-to-first-token here."""
        req = self._requests.get(str(request_id))
        return None if req is None else req.seq.num_generated_tokens

    # ---- stepping ------------------------------------------------------------
    def step(self):
        """Runs one scheduler step; returns the ``RequestOutput`` of every
        request that advanced (cumulative; ``finished`` set on the last)."""
        return self._step(finished_only=False)

    def _step(self, finished_only: bool):
        # inference_mode skips autograd's version/view bookkeeping on every op,
        # which is a visible share of a small model's step on CPU.
        with torch.inference_mode():
            return self._step_inner(finished_only)

    def _step_inner(self, finished_only: bool):
        t0 = time.perf_counter()
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return self._drain(finished_only)       # idle: finish any deferred text
        t1 = time.perf_counter()
        try:
            if is_prefill:
                input_ids, positions, meta, last = self.runner.prepare(seqs, True)
                t2 = time.perf_counter()
                hidden = self.model.forward(input_ids, positions, meta, self.runner.kv_caches)
                logits = self.model.compute_logits(hidden[last])
            else:
                step = self.decode_runner.prepare(seqs)
                t2 = time.perf_counter()
                logits = self.decode_runner.launch(step)
            t3 = time.perf_counter()
            pending = self.sampler.launch(logits, seqs, self.model.ops)
        except BaseException:
            # Nothing was appended: put the batch back to be recomputed.
            self.scheduler.requeue(seqs)
            raise
        t4 = time.perf_counter()
        # While the device runs this step, finish the previous step's text.
        outputs = self._drain(finished_only) if self.async_output else []
        t5 = time.perf_counter()
        tokens, lps = pending.wait()                # the step's one device->host read
        t6 = time.perf_counter()
        for seq, tok, lp in zip(seqs, tokens, lps):
            if seq.is_finished:                     # a stop string ended it meanwhile
                continue
            req = self._requests[seq.request_id]
            reason = req.append_token(tok, lp)
            if reason is None and self.async_output:
                self._deferred.append(req)
                continue
            self._emit(req, req.detokenize() or reason, finished_only, outputs)
        t7 = time.perf_counter()
        st = self.step_times
        st["schedule"] += t1 - t0
        st["prepare"] += t2 - t1
        st["launch"] += t3 - t2
        st["sample"] += t4 - t3
        st["wait"] += t6 - t5
        st["output"] += (t5 - t4) + (t7 - t6)
        self.num_steps += 1
        return outputs

    def _emit(self, req: RequestState, reason, finished_only: bool, outputs: list) -> None:
        if reason is not None:
            self.scheduler.finish(req.seq, reason)
            del self._requests[req.request_id]
        if reason is not None or not finished_only:
            outputs.append(req.output())

    def _drain(self, finished_only: bool) -> list:
        """Detokenizes (and checks stop strings of) the requests whose text was
        deferred last step; returns their outputs."""
        outputs = []
        deferred, self._deferred = self._deferred, []
        for req in deferred:
            if req.seq.is_finished or req.request_id not in self._requests:
                continue
            self._emit(req, req.detokenize(), finished_only, outputs)
        return outputs

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True):
        """Generates for one prompt or a list; returns ``RequestOutput``s in input order.

        prompts: a str, a list of str, or ``{"prompt_token_ids": [...]}`` dicts.
        sampling_params: one SamplingParams for all, or a list (one per prompt).
        Every request is validated before any is queued.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
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
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text deltas of one request as they are generated.

        Other queued requests advance too; their outputs are only visible
        through ``step()``, so don't mix ``stream`` with your own step loop.
        """
        req = self.prepare_request(prompt, params)
        rid = self.enqueue_request(req)
        sent = 0
        try:
            while True:
                for out in self.step():
                    if out.request_id == rid:
                        text = out.outputs[0].text
                        if len(text) > sent:
                            yield text[sent:]
                            sent = len(text)
                        if out.finished:
                            return
        finally:
            self.abort(rid)


STEP_PHASES = ("schedule", "prepare", "launch", "sample", "wait", "output")

_VLLM_IGNORED = {"trust_remote_code", "tensor_parallel_size", "quantization", "revision",
                 "tokenizer_mode", "swap_space", "disable_log_stats"}


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x
