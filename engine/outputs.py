"""Result objects, shaped like vLLM's ``RequestOutput``/``CompletionOutput``."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepLogprobs:
    """Host-side log-prob info of one sampled row, what the sampler hands the request's
    output (engine-internal): the sampled token's log-prob, and (if requested)
    ``{token_id: (logprob, rank)}`` for top-N + requested ids."""

    sampled_logprob: float
    entries: dict[int, tuple[float, int]] | None


@dataclass(slots=True)
class Logprob:
    """Log-prob of one token at one step (log-softmax of raw logits).

    rank: 1 for the most likely token (ties share the better rank).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None      # "stop", "length", "abort", "error" or None (running)
    stop_reason: int | str | None = None  # the stop string or token id that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # finish_reason "error": what failed, naming the request (else None)
    error: str | None = None
    # SamplingParams.prompt_logprobs: None for the first prompt token (and for tokens
    # before an extension), then {token_id: Logprob} with the actual token and the top-N
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # speculative decoding: drafts verified for this request, and how many were accepted
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
