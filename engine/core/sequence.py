"""A sequence: one prompt and the tokens generated after it.

Plain Python, no torch: the scheduler and the block manager work on these,
and only the model runner turns them into tensors.
"""
from __future__ import annotations

import enum
from itertools import count
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # not in the KV cache (new, or preempted for recompute)
    RUNNING = "running"      # holds KV blocks; decoding
    FINISHED = "finished"


_seq_ids = count()


class Sequence:
    """Token ids of one sequence plus its KV bookkeeping.

    ``token_ids`` holds the prompt followed by every generated token.
    ``block_table[i]`` is the KV-cache block holding positions
    ``[i * block_size, (i + 1) * block_size)``; the block manager owns it.
    ``num_cached_tokens`` is how many leading tokens already have their K/V in
    the cache (prefix-cache hits at allocation); prefill computes the rest.

    ``num_pending``: tokens sampled on the device whose ids the host has not read back
    yet (async scheduling, engine/engine_core.py: at most 2, the step in flight and the
    one just queued). They count in ``len(seq)``, so the scheduler and the block manager
    give them their KV slots, but are not in ``token_ids``: whatever reads the text or
    the ids sees only tokens the host knows. Reading a step back appends its token and
    takes one off ``num_pending``.
    """

    def __init__(self, prompt_token_ids: list[int], request_id: str = "", params: Any = None,
                 seq_id: int | None = None):
        self.seq_id: int = next(_seq_ids) if seq_id is None else seq_id
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        # Sum of the raw-logit log-probs of the generated tokens.
        self.cumulative_logprob = 0.0
        # Opaque per-sequence state for the sampler (e.g. a torch.Generator), and what a
        # seeded request's sample i adds to the seed (SamplingParams(n=k, seed=s): s + i).
        self.sampler_state: Any = None
        self.seed_offset = 0
        # When set, the next prefill must report the log-probs of the tokens at positions
        # [logprobs_from, len) (prompt_logprobs, LLM.score): it computes positions
        # logprobs_from - 1 onwards (no prefix-cache reuse past that), then clears this.
        self.logprobs_from: int | None = None
        self.num_pending = 0

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, len={len(self)}, "
                f"status={self.status.value}, blocks={self.block_table})")
