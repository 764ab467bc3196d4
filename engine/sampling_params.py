"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from engine.errors import InvalidRequestError


class SamplingParamsError(InvalidRequestError):
    """A SamplingParams field has an invalid value; the message names it."""


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    temperature: 0 means greedy (exact argmax, no RNG); > 0 samples from
        softmax(logits / temperature).
    top_p: nucleus sampling mass in (0, 1]. top_k: keep the k best (-1: all).
    max_tokens: generated tokens at most (>= 1).
    stop: strings that end generation; the text is cut before the match.
    stop_token_ids: token ids that end generation (kept in token_ids).
    ignore_eos: keep going past the EOS token.
    skip_special_tokens: hide special/added tokens in ``.text``.
    logprobs: return the top-N log-probs at each step (None: none).
    logprob_token_ids: ids whose log-probs are returned at every step, whatever
        their rank. Together with ``logprobs``: the union.
    logits_processors: objects called once per step as
        ``proc(logits [n, V], request_ids: list[str], output_token_ids:
        list[list[int]]) -> logits [n, V]``; see ``engine.logits_process``.
    seed: per-request RNG seed for reproducible sampling.

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
    # Normalised views, filled by __post_init__.
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        def bad(name, why):
            raise SamplingParamsError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", "must be -1 (disabled) or >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1 (or None: up to max_model_len)")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            bad("logprobs", "must be None or an integer >= 0")
        if self.n != 1:
            bad("n", "only n=1 is supported; fork sequences for several samples")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        for name in ("stop_token_ids", "logprob_token_ids"):
            ids = getattr(self, name)
            if ids is not None:
                if isinstance(ids, (str, bytes)) or not all(
                        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                    bad(name, "must be a list of non-negative token ids")
                setattr(self, name, list(ids))
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or s == "" for s in stop):
            bad("stop", "must be a non-empty string or a list of them")
        self.stop_list = stop
        procs = self.logits_processors
        if procs is not None:
            if not all(callable(p) for p in procs):
                bad("logits_processors", "every entry must be callable")
            self.logits_processors = list(procs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None or bool(self.logprob_token_ids)
