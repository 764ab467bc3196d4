"""The public entry point: ``LLM``, shaped like vLLM's.

    from engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))

Besides ``generate`` it offers a step-level API for embedding the engine in
an event loop: ``add_request``, ``step``, ``abort`` and ``stream``; and the
per-request primitives of engine/request_api.py (``fork``, ``extend``, ``score``, ...).
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from typing import Iterator

import torch
from tqdm.auto import tqdm

from engine import request_validation
from engine.core.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.engine_core import STEP_PHASES, EngineCore
from engine.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from engine.model.loader import load_model, resolve_model_dir
from engine.model.named_models import resolve_named_model
from engine.request_api import RequestAPI
from engine.sampling.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.tokenizer import get_tokenizer
from engine.worker import kv_sizing
from engine.worker.cuda_graphs import build_decode_runner
from engine.worker.executor import Executor
from engine.worker.model_runner import ModelRunner
from engine.worker.prefill_graphs import DEFAULT_MAX_TOKENS, build_prefill_runner, graph_shape as prefill_graph_shape


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
            Triton kernels, decode steps (and speculative verify steps) replay CUDA
            graphs captured at start-up for batch buckets 1, 2, 4, ... up to
            max_num_seqs, and prefill steps of up to ``prefill_graph_max_tokens``
            tokens in up to 16 sequences replay graphs per token bucket 16, 32, ...
            (capture time is printed); longer prefills and CPU run eagerly.
        prefill_graph_max_tokens: the largest prefill graph's token count, a power of
            two >= 16 (512; 0: prefill always eager). See engine/worker/prefill_graphs.py.
        async_scheduling: queue each plain decode step before the last one is read
            back, so the host's work overlaps the device's (vLLM's flag of that name).
            None: on with CUDA, off on CPU (nothing to overlap there). Output is the
            same token for token; steps that need host state run synchronously. See
            engine/engine_core.py.
    """

    def __init__(self, model: str, tokenizer: str | None = None, skip_tokenizer_init: bool = False,
                 dtype: str | torch.dtype = "auto", device: str | None = "auto",
                 max_model_len: int | None = None, block_size: int = 16,
                 num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, load_format: str = "auto", seed: int = 0,
                 kernel_backend: str = "auto", download_dir: str | None = None,
                 show_progress: bool = True, enforce_eager: bool = False,
                 speculative_config: dict | None = None, quantization: str | None = None,
                 prefill_graph_max_tokens: int = DEFAULT_MAX_TOKENS, async_scheduling: bool | None = None,
                 **unused):
        request_validation.check_vllm_kwargs(unused)
        request_validation.check_engine_args(
            model=model, tokenizer=tokenizer, download_dir=download_dir, max_num_seqs=max_num_seqs,
            block_size=block_size, num_kv_blocks=num_kv_blocks, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens, seed=seed,
            enable_prefix_caching=enable_prefix_caching, skip_tokenizer_init=skip_tokenizer_init,
            show_progress=show_progress, enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization, prefill_graph_max_tokens=prefill_graph_max_tokens,
            async_scheduling=async_scheduling)
        model = resolve_named_model(model)       # "smollm2", "selfrag-smollm2": fetched/built once
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
        self.startup["gemv"] = dict(self.model.gemv_rows)
        if self.model.device.type == "cuda":            # which matmul each projection runs, and why
            print(self.model.gemv_note, file=sys.stderr)
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
        from engine.spec_decode.speculator import Speculator
        speculator = Speculator(speculative_config) if speculative_config is not None else None
        t = time.perf_counter()
        num_blocks = num_kv_blocks
        if not num_blocks:
            graphs = None          # the CUDA graphs' pool, counted in the reserve
            if self.model.device.type == "cuda" and not enforce_eager and self.model.ops.name == "triton":
                top, seqs = prefill_graph_shape(prefill_graph_max_tokens, max_num_seqs,
                                                self.max_num_batched_tokens)
                graphs = dict(verify_query_len=1 + speculator.k if speculator else 1,
                              prefill_max_tokens=top, prefill_max_seqs=seqs)
            num_blocks, sizing = kv_sizing.default_num_blocks(
                self.model, block_size, max_num_seqs, self.max_model_len, self.max_num_batched_tokens,
                gpu_memory_utilization, verbose=show_progress, graphs=graphs)
            if sizing is not None:
                self.startup["kv_sizing"] = sizing
        self.startup["kv_sizing_s"] = time.perf_counter() - t
        blocks_per_seq = -(-self.max_model_len // block_size)
        if num_blocks < blocks_per_seq:
            raise ValueError(f"the KV cache ({num_blocks} blocks of {block_size} tokens) cannot hold "
                             f"one sequence of max_model_len={self.max_model_len}; raise "
                             "num_kv_blocks/gpu_memory_utilization or lower max_model_len")
        t = time.perf_counter()
        runner = ModelRunner(self.model, block_size, num_blocks)
        self.startup["kv_alloc_s"] = time.perf_counter() - t
        self.startup["num_kv_blocks"] = num_blocks
        # Decode and verify steps: persistent inputs, CUDA graphs where they apply (printed on CUDA).
        t = time.perf_counter()
        cuda = self.model.device.type == "cuda"
        if cuda:
            self.startup["gpu_free_bytes_before_graphs"] = torch.cuda.mem_get_info(self.model.device)[0]
        decode_runner = build_decode_runner(self.model, runner.kv_caches, block_size, max_num_seqs,
                                            self.max_model_len, enforce_eager,
                                            verify_query_len=1 + speculator.k if speculator else 1)
        self.startup["decode_runner_s"] = time.perf_counter() - t
        t = time.perf_counter()
        prefill_runner, self.prefill_graphs = build_prefill_runner(
            self.model, runner.kv_caches, block_size, self.max_model_len, max_num_seqs,
            self.max_num_batched_tokens, decode_runner, prefill_graph_max_tokens)
        self.startup["prefill_graphs_s"] = time.perf_counter() - t
        if cuda:
            self.startup["gpu_free_bytes_after_graphs"] = torch.cuda.mem_get_info(self.model.device)[0]
            self.startup["graph_pool_bytes"] = (self.startup["gpu_free_bytes_before_graphs"]
                                                - self.startup["gpu_free_bytes_after_graphs"])
        scheduler = Scheduler(BlockManager(num_blocks, block_size, enable_prefix_caching), max_num_seqs,
                              self.max_num_batched_tokens)
        self.eos_token_id = (self.tokenizer.eos_token_id if self.tokenizer is not None
                             else _first(cfg.eos_token_id))
        sampler = Sampler(self.model.device, seed)
        sampler.eos_token_id = self.eos_token_id                # min_tokens masks it
        executor = Executor(self.model, runner, decode_runner, sampler, self.tokenizer,
                            dict.fromkeys(STEP_PHASES, 0.0), prefill_runner=prefill_runner)
        # Async output processing (CUDA): a step's detokenization and stop-string checks
        # run while the device computes the next step; outputs then lag one step. On CPU
        # nothing would overlap, so it is off.
        self.core = EngineCore(scheduler, executor, tokenizer=self.tokenizer, config=cfg,
                               max_model_len=self.max_model_len, eos_token_id=self.eos_token_id,
                               async_output=cuda,
                               speculator=speculator,
                               async_scheduling=cuda if async_scheduling is None else async_scheduling)
        self._ids = itertools.count()

    # ---- the components (engine/engine_core.py) ------------------------------------
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def runner(self):
        """The model runner: the KV pool and prefill inputs (engine/worker/model_runner.py)."""
        return self.core.executor.runner

    @property
    def decode_runner(self):
        """Decode steps' inputs and CUDA graphs (engine/worker/cuda_graphs.py); replaceable."""
        return self.core.executor.decode_runner

    @decode_runner.setter
    def decode_runner(self, runner) -> None:
        self.core.executor.decode_runner = runner

    @property
    def prefill_runner(self):
        """Prefill steps' graphs (engine/worker/prefill_graphs.py), None when prefill runs
        eagerly; replaceable."""
        return self.core.executor.prefill_runner

    @prefill_runner.setter
    def prefill_runner(self, runner) -> None:
        self.core.executor.prefill_runner = runner

    @property
    def sampler(self):
        return self.core.executor.sampler

    @property
    def speculator(self):
        return self.core.speculator

    @property
    def step_times(self) -> dict:
        """Host seconds per phase of ``step``, summed over all steps (see ``EngineCore``)."""
        return self.core.step_times

    @property
    def num_steps(self) -> int:
        return self.core.num_steps

    @property
    def async_output(self) -> bool:
        """Whether a step's text is processed during the next step (default: on CUDA)."""
        return self.core.outputs.async_output

    @async_output.setter
    def async_output(self, on: bool) -> None:
        self.core.outputs.async_output = bool(on)

    @property
    def async_scheduling(self) -> bool:
        """Whether plain decode steps are queued before the last one is read back."""
        return self.core.async_scheduling

    @async_scheduling.setter
    def async_scheduling(self, on: bool) -> None:
        if not on:
            self._read_back_inflight()
        self.core.async_scheduling = bool(on)

    @property
    def scheduling_stats(self) -> dict:
        """Async scheduling: steps queued ahead (``overlapped``) and the steps that ran
        synchronously, by reason (``sync``)."""
        return dict(overlapped=self.core.num_overlapped_steps, sync=dict(self.core.sync_reasons))

    @property
    def cuda_graphs(self) -> dict:
        """Whether decode replays CUDA graphs: ``enabled``, ``reason`` (why not),
        ``buckets``, ``capture_s``, ``error`` (a failed capture's exception)."""
        return dict(self.decode_runner.graph_status)

    # ---- stepping ------------------------------------------------------------
    def step(self):
        """Runs one scheduler step; returns the ``RequestOutput`` of every
        request that advanced (cumulative; ``finished`` set on the last), led by
        any outputs of this engine's requests that a ``generate``/``stream`` call
        stepped past (nothing is dropped). A request that failed comes back
        finished with ``finish_reason="error"`` and ``.error``; the others go on.
        Raises ``EngineDeadError`` once the engine itself has failed."""
        outs = self.core.step(finished_only=False)
        undelivered = self.core.undelivered
        if undelivered:
            new = {o.request_id for o in outs}
            earlier = [o for rid, o in undelivered.items() if rid not in new]
            undelivered.clear()
            outs = earlier + outs
        return outs

    @property
    def engine_error(self) -> EngineDeadError | None:
        """The error that made this engine unusable (None while it works)."""
        return self.core.dead

    def check_alive(self) -> None:
        """Raises the ``EngineDeadError`` that made this engine unusable, if any."""
        self.core.check_alive()

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
        self.check_alive()
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
                for out in self.core.step(finished_only=True):
                    if out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
                    else:
                        self.core.undelivered[out.request_id] = out
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
                for out in self.core.step(finished_only=False):
                    if out.request_id != rid:
                        self.core.undelivered[out.request_id] = out
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


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x
