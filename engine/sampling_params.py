"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams``."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

from engine.errors import InvalidRequestError


class SamplingParamsError(InvalidRequestError):
    """A SamplingParams field has an invalid value; the message names it."""


def is_int(x) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A finite real number (ints included), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    temperature: 0 means greedy (exact argmax, no RNG); > 0 samples from
        softmax(logits / temperature).
    top_p: nucleus sampling mass in (0, 1]. top_k: keep the k best (-1: all).
    max_tokens: generated tokens at most (>= 1).
    stop: strings that end generation; the text is cut before the match.
    stop_token_ids: token ids that end generation (kept in token_ids).
    include_stop_str_in_output: keep the matched stop string at the end of the text
        (it is cut off by default). Streamed text is then never held back: what has
        been sent is always a prefix of the final text.
    ignore_eos: keep going past the EOS token.
    skip_special_tokens: hide special/added tokens in ``.text``.
    logprobs: return the top-N log-probs at each step (None: none).
    logprob_token_ids: ids whose log-probs are returned at every step, whatever
        their rank. Together with ``logprobs``: the union.
    logits_processors: objects called once per step as
        ``proc(logits [n, V], request_ids: list[str], output_token_ids:
        list[list[int]]) -> logits [n, V]`` (batched), or vLLM's per-request
        ``proc(output_ids, logits_row)`` / ``proc(prompt_ids, output_ids, logits)``
        (called per row after the batched ones); see ``engine/sampling/logits_processors.py``.
    seed: per-request RNG seed for reproducible sampling (sample i of n: seed + i).
    n: samples of the prompt (one prefill; they share its KV); ``RequestOutput.outputs``
        holds n completions. Greedy gives n identical ones, as vLLM does.
    repetition_penalty: > 0; 1 is off. HF's and vLLM's rule over prompt and output
        tokens: a seen token's positive logit is divided by it, a negative one multiplied.
    presence_penalty, frequency_penalty: -2 ... 2 (OpenAI's): ``logit -= frequency *
        count + presence * (count > 0)`` over the output tokens.
    min_tokens: EOS (unless ignore_eos) and ``stop_token_ids`` are masked until this
        many tokens have been generated (vLLM's rule; HF masks EOS only).
    logit_bias: {token id: bias in -100 ... 100}, added to the logits (OpenAI's).
    min_p: 0 ... 1; sampled rows keep tokens whose probability is at least min_p
        times the most likely one's (after temperature).
    bad_words: strings never generated. Each is tokenized as at the start of the text
        and, where that differs in its first token only, after a space (vLLM's rule); a
        word of several tokens is banned at its last token when the output already ends
        with the others. Needs the engine's tokenizer.
    hold: when the request finishes (stop or length), keep its KV blocks: ``LLM.extend``
        continues it with more tokens over its cached context, ``LLM.fork`` copies it,
        ``LLM.release`` frees it. ``max_tokens=0`` with ``hold`` prefills the prompt and
        holds it without generating.
    prompt_logprobs: N >= 0: ``RequestOutput.prompt_logprobs`` holds, per prompt token
        after the first, its log-prob and the top-N (vLLM's shape). Those positions are
        computed even where the prefix cache holds them. ``max_tokens=0``: prefill only.
        Held blocks may be dropped under memory pressure; a later ``extend`` then
        recomputes them (correctness never depends on the hold).

    All log-probs (and ``cumulative_logprob``) are log-softmax of the raw
    model logits, before processors, temperature, top-k/p or masks.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    logprob_token_ids: Sequence[int] | None = None
    logits_processors: Sequence[Any] | None = None
    seed: int | None = None
    n: int = 1
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    min_p: float = 0.0
    bad_words: Sequence[str] | None = None
    include_stop_str_in_output: bool = False
    hold: bool = False
    prompt_logprobs: int | None = None
    best_of: int | None = None
    # Normalised views, filled by __post_init__.
    stop_list: list[str] = field(init=False, repr=False)
    # The bad words as token-id sequences, filled by the engine (it has the tokenizer).
    bad_words_token_ids: list[list[int]] | None = field(init=False, repr=False, default=None)
    _split: tuple = field(init=False, repr=False, compare=False, default=((), [], []))

    def __post_init__(self):
        def bad(name, why):
            raise SamplingParamsError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        def ids(name):
            v = getattr(self, name)
            if v is None:
                return
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                bad(name, "must be a list of non-negative token ids")
            v = list(v.tolist() if hasattr(v, "tolist") else v)
            if not all(is_int(t) and t >= 0 for t in v):
                bad(name, "must be a list of non-negative token ids")
            setattr(self, name, [int(t) for t in v])

        if not is_real(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0: greedy)")
        self.temperature = float(self.temperature)
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be a number in (0, 1]")
        self.top_p = float(self.top_p)
        if not is_int(self.top_k) or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", "must be -1 (disabled) or an integer >= 1")
        if not isinstance(self.hold, bool):
            bad("hold", "must be True or False")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            bad("prompt_logprobs", "must be None or an integer >= 0 (top-N besides the actual token)")
        prefill_only = self.hold or self.prompt_logprobs is not None
        least = 0 if prefill_only else 1
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < least):
            bad("max_tokens", "must be an integer >= 1 (or None: up to max_model_len; 0 only with "
                "hold=True or prompt_logprobs: prefill only)")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", "must be None or an integer >= 0")
        if not is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1 (samples of the prompt)")
        if self.best_of is not None and self.best_of != self.n:
            bad("best_of", "is not supported (only None or equal to n): sample n and rerank "
                "(examples/best_of_n.py)")
        if self.n > 1 and self.hold:
            bad("n", "cannot be > 1 with hold=True (hold one request, then LLM.fork it)")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be None or an integer")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        ids("stop_token_ids")
        ids("logprob_token_ids")
        if self.stop is None or isinstance(self.stop, str):
            stop = [] if self.stop is None else [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            stop = list(self.stop)
        else:
            bad("stop", "must be a string or a list of strings")
        if any(not isinstance(x, str) or x == "" for x in stop):
            bad("stop", "must be a non-empty string or a list of them")
        self.stop_list = stop
        procs = self.logits_processors
        if procs is not None:
            if callable(procs) and not isinstance(procs, (list, tuple)):
                bad("logits_processors", "must be a list of callables (wrap the one in a list)")
            if not isinstance(procs, (list, tuple)) or not all(callable(p) for p in procs):
                bad("logits_processors", "must be a list of callables")
            self.logits_processors = list(procs)
        if not is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a number > 0 (1: off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_real(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "must be a number in [-2, 2] (0: off)")
            setattr(self, name, float(getattr(self, name)))
        self.repetition_penalty = float(self.repetition_penalty)
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be a number in [0, 1] (0: off)")
        self.min_p = float(self.min_p)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be a dict {token id: bias}")
            bias = {}
            for k, v in self.logit_bias.items():
                key = int(k) if isinstance(k, str) and k.strip().isdigit() else k   # JSON keys are strings
                if not is_int(key) or key < 0:
                    bad("logit_bias", f"key {k!r} is not a token id")
                if not is_real(v) or not -100 <= v <= 100:
                    bad("logit_bias", f"bias {v!r} of token {k} is not a number in [-100, 100]")
                bias[int(key)] = float(v)
            self.logit_bias = bias or None
        if self.bad_words is not None:
            words = [self.bad_words] if isinstance(self.bad_words, str) else self.bad_words
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
                bad("bad_words", "must be a list of non-empty strings")
            self.bad_words = list(words) or None
        for name in ("top_k", "max_tokens", "logprobs", "seed", "min_tokens", "prompt_logprobs"):    # numpy ints -> int
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, int(v))

    def _split_processors(self) -> tuple:
        """(ours, vLLM's per-request as (callable, form)), recomputed only when the list
        changed (callers may replace ``logits_processors`` after construction)."""
        procs = self.logits_processors or []
        key = self._split[0]                # the processors themselves, held: compared by identity
        if len(key) != len(procs) or any(a is not b for a, b in zip(key, procs)):
            forms = [(p, processor_form(p)) for p in procs]
            self._split = (tuple(procs), [p for p, f in forms if f == "batched"],
                           [(p, f) for p, f in forms if f != "batched"])
        return self._split

    @property
    def batched_logits_processors(self) -> list:
        return self._split_processors()[1]

    @property
    def row_logits_processors(self) -> list:
        return self._split_processors()[2]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None or bool(self.logprob_token_ids)


def processor_form(proc) -> str:
    """"batched" (our protocol), "row" (vLLM's ``(output_ids, logits_row)``) or
    "row_with_prompt" (vLLM's ``(prompt_ids, output_ids, logits_row)``), from the
    callable's signature: two positional parameters are vLLM's first form; of three, a
    last one whose name mentions logits (vLLM names it ``logits``) is vLLM's second,
    anything else ours (whose first is the logits). ``per_request`` says it explicitly."""
    form = getattr(proc, "logits_processor_form", None)
    if form is not None:
        return form
    import inspect
    try:
        params = [p for p in inspect.signature(proc).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):      # no signature (a builtin): our protocol
        return "batched"
    if len(params) == 2:
        return "row"
    if len(params) == 3 and "logit" in params[2].name.lower():
        return "row_with_prompt"
    return "batched"
