"""Checks of what users hand the engine: prompts, per-request parameters against the
model, ``LLM(...)``'s own arguments, and the vLLM-only arguments scripts bring along.

Every bad value raises a ``ValueError`` subclass whose message names the parameter
and the value, never a ``TypeError`` from deep inside (an unknown keyword argument
still raises ``TypeError``, as Python does). Integer fields accept numpy integers;
booleans are never taken for numbers.
"""
from __future__ import annotations

import os
import warnings

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.sampling_params import SamplingParams, is_int, is_real

# vLLM arguments that would change results: refused, not ignored.
_UNSUPPORTED = {
    "tensor_parallel_size": lambda v: v != 1,
    "pipeline_parallel_size": lambda v: v != 1,
    "cpu_offload_gb": lambda v: v not in (0, None),
}
# vLLM arguments that change nothing here: accepted, each with one warning per process.
_HARMLESS = {"trust_remote_code", "tokenizer_mode", "revision", "tokenizer_revision", "code_revision",
             "swap_space", "disable_log_stats", "disable_custom_all_reduce", "max_seq_len_to_capture",
             "max_logprobs", "distributed_executor_backend", "compilation_config", "hf_overrides",
             "tensor_parallel_size", "pipeline_parallel_size", "cpu_offload_gb"}
_warned: set[str] = set()


def check_vllm_kwargs(kwargs: dict) -> None:
    """Refuses vLLM arguments we cannot honour, warns once about each harmless one,
    and raises TypeError for anything else."""
    for key, value in kwargs.items():
        refuse = _UNSUPPORTED.get(key)
        if refuse is not None and refuse(value):
            raise ValueError(f"LLM({key}={value!r}) is not supported by this engine (one GPU, "
                             f"fp16/bf16/fp32 weights); leave {key} unset")
        if key not in _HARMLESS:
            raise TypeError(f"LLM() got an unexpected keyword argument {key!r}")
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"LLM({key}=...) is a vLLM argument with no effect here; it is ignored",
                          stacklevel=3)


def check_engine_args(**args) -> None:
    """``LLM(...)``'s own arguments: paths are paths, ints are ints (>= their minimum),
    flags are bools."""
    for name in ("model", "tokenizer", "download_dir"):
        v = args.get(name)
        if not isinstance(v, (str, os.PathLike)) and (v is not None or name == "model"):
            raise ValueError(f"LLM({name}={v!r}): must be a path (str)"
                             + ("" if name == "model" else " or None"))
    ints = {"max_num_seqs": 1, "block_size": 1, "num_kv_blocks": 1, "max_model_len": 2,
            "max_num_batched_tokens": 1, "seed": None}
    for name, lo in ints.items():
        v = args.get(name)
        if v is None and name in ("num_kv_blocks", "max_model_len", "max_num_batched_tokens"):
            continue
        if not is_int(v) or (lo is not None and v < lo):
            raise ValueError(f"LLM({name}={v!r}): must be an integer"
                             + (f" >= {lo}" if lo is not None else ""))
    for name in ("enable_prefix_caching", "skip_tokenizer_init", "show_progress", "enforce_eager"):
        if not isinstance(args.get(name), bool):
            raise ValueError(f"LLM({name}={args.get(name)!r}): must be True or False")
    if not isinstance(args.get("async_scheduling"), (bool, type(None))):
        raise ValueError(f"LLM(async_scheduling={args.get('async_scheduling')!r}): must be True, False or None")
    util = args.get("gpu_memory_utilization")
    if not is_real(util) or not 0 < util <= 1:
        raise ValueError(f"LLM(gpu_memory_utilization={util!r}): must be a number in (0, 1]")
    bs = args.get("block_size")
    if bs & (bs - 1):
        raise ValueError(f"LLM(block_size={bs!r}): must be a power of two")
    pg = args.get("prefill_graph_max_tokens")
    if not is_int(pg) or (pg != 0 and (pg < 16 or pg & (pg - 1))):
        raise ValueError(f"LLM(prefill_graph_max_tokens={pg!r}): must be 0 (prefill always eager) or a "
                         "power of two >= 16")


def token_id_list(ids, what: str, vocab: int) -> list[int]:
    """``ids`` (a list, tuple, range or 1-D numpy/torch integer array) as a list of ints
    in [0, vocab); anything else raises InvalidRequestError naming ``what``."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):   # numpy / torch
        if getattr(ids, "ndim", 1) != 1:
            raise InvalidRequestError(f"{what} must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple, range)):
        raise InvalidRequestError(f"{what} must be a list of token ids, got {type(ids).__name__}")
    bad = [t for t in ids if not is_int(t) or not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"{what} must hold ints in [0, {vocab}); got {bad[:5]!r}"
                                  + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return [int(t) for t in ids]


def prompt_ids(prompt, tokenizer, vocab: int, max_model_len: int) -> tuple[str | None, list[int]]:
    """(prompt text or None, token ids) of one prompt: a non-empty str, or a dict with
    ``prompt_token_ids`` (and optionally its ``prompt`` text) or ``prompt``."""
    text = None
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        if unknown:
            raise InvalidRequestError(f"a dict prompt takes 'prompt_token_ids' and/or 'prompt'; "
                                      f"unknown keys {sorted(map(str, unknown))}")
        if "prompt_token_ids" in prompt:
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise InvalidRequestError(f"'prompt' must be a str, got {type(text).__name__}")
            ids = token_id_list(prompt["prompt_token_ids"], "prompt_token_ids", vocab)
        elif "prompt" in prompt:
            return prompt_ids(prompt["prompt"], tokenizer, vocab, max_model_len)
        else:
            raise InvalidRequestError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
    elif isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer: pass prompts as "
                                      "{'prompt_token_ids': [...]}")
        ids, text = tokenizer.encode(prompt), prompt
    else:
        raise InvalidRequestError(f"a prompt must be a str or a dict, got {type(prompt).__name__}")
    if not ids:
        raise InvalidRequestError("the prompt is empty (no tokens)")
    if len(ids) >= max_model_len:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens; with at least one new "
                                 f"token it does not fit max_model_len={max_model_len}")
    return text, ids


def bad_words_token_ids(words: list[str], tokenizer) -> list[list[int]]:
    """Each bad word as it tokenizes at the start of a text, plus, after a space, when
    that spelling has a different first token and as many tokens (a word of its own
    rather than a split of the space), as vLLM bans them."""
    out: list[list[int]] = []
    for w in words:
        plain = tokenizer.encode(w.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + w.lstrip(), add_special_tokens=False)
        for ids in (plain, spaced):
            if ids and ids not in out and (ids is plain or (ids[0] != plain[0] and len(ids) == len(plain))):
                out.append(ids)
    return out


def check_params(params, vocab: int, tokenizer=None) -> SamplingParams:
    """A request's SamplingParams, checked against the model's vocabulary."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"sampling params must be SamplingParams, got "
                                  f"{type(params).__name__}")
    for name in ("stop_token_ids", "logprob_token_ids"):
        bad = [t for t in getattr(params, name) or [] if t >= vocab]
        if bad:
            raise InvalidRequestError(f"SamplingParams.{name} has ids {bad} >= vocab size {vocab}")
    if params.bad_words and params.bad_words_token_ids is None:
        if tokenizer is None:
            raise InvalidRequestError("SamplingParams.bad_words needs a tokenizer; this engine has "
                                      "none (ban token ids with logit_bias instead)")
        params.bad_words_token_ids = bad_words_token_ids(params.bad_words, tokenizer)
    bad_bias = [t for t in params.logit_bias or {} if t >= vocab]
    if bad_bias:
        raise InvalidRequestError(f"SamplingParams.logit_bias has ids {bad_bias} >= vocab size {vocab}")
    if params.logprobs is not None and params.logprobs > vocab:
        raise InvalidRequestError(f"SamplingParams.logprobs={params.logprobs} > vocab size {vocab}")
    return params


