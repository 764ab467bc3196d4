"""Draft proposers for speculative decoding: what the engine asks, per decoding sequence
and step, for up to k tokens the model is likely to write next.

The interface is small so that users can write their own (and pass it as
``speculative_config={"method": "custom", "proposer": obj, ...}``)::

    class MyProposer:
        def propose(self, seq_id: int, token_ids: list[int], k: int) -> list[int]:
            ...            # up to k guesses of the next tokens (may be empty)
        def forget(self, seq_id: int) -> None:
            ...            # the sequence is gone (optional)

``token_ids`` is the sequence so far (prompt, then output); it only grows between calls
for one ``seq_id`` while the sequence runs (a preempted sequence keeps its tokens).
Drafts cost nothing when they are wrong except the verify step's extra positions: the
engine keeps exactly the tokens plain decoding would have produced.

``NgramProposer`` is prompt-lookup decoding: the longest suffix of the sequence (between
``prompt_lookup_min`` and ``prompt_lookup_max`` tokens) that occurred earlier in it
proposes the tokens that followed that earlier occurrence (its latest one). Self-RAG
answers copy spans of the passage in their prompt, which is where this pays.
"""
from __future__ import annotations

from collections import OrderedDict


class NgramProposer:
    """Prompt-lookup drafts from an index kept per sequence and updated with the tokens
    appended since the last call, so a step costs O(prompt_lookup_max) dictionary
    lookups whatever the context length."""

    def __init__(self, prompt_lookup_min: int = 1, prompt_lookup_max: int = 4, shared: bool = False,
                 shared_entries: int = 200_000):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={prompt_lookup_min}, prompt_lookup_max={prompt_lookup_max}: "
                             "need 1 <= min <= max")
        self.lo, self.hi = prompt_lookup_min, prompt_lookup_max
        # seq_id -> (tokens indexed, {n: {n-gram: position right after its latest earlier end}})
        self._index: dict[int, tuple[int, dict]] = {}
        self._tokens: dict[int, list[int]] = {}
        # ``shared``: what finished sequences wrote also drafts for later ones (answers to
        # similar prompts repeat phrases): {n: {n-gram: the tokens that followed}},
        # oldest dropped first beyond ``shared_entries`` per n
        self.shared = {n: OrderedDict() for n in range(self.lo, self.hi + 1)} if shared else None
        self.shared_entries = shared_entries

    def _update(self, seq_id: int, toks: list[int]) -> dict:
        done, grams = self._index.get(seq_id, (0, None))
        if grams is None or done > len(toks):
            done, grams = 0, {n: {} for n in range(self.lo, self.hi + 1)}
        # An n-gram ending at position i is indexed once token i + 1 exists, so a lookup
        # of the current suffix (ending at the last token) finds only earlier occurrences.
        for i in range(max(done - 1, 0), len(toks) - 1):
            for n, table in grams.items():
                if i + 1 >= n:
                    table[tuple(toks[i + 1 - n:i + 1])] = i + 1
        self._index[seq_id] = (len(toks), grams)
        self._tokens[seq_id] = toks
        return grams

    def propose(self, seq_id: int, token_ids: list[int], k: int) -> list[int]:
        grams = self._update(seq_id, token_ids)
        top = min(self.hi, len(token_ids))
        for n in range(top, self.lo - 1, -1):
            start = grams[n].get(tuple(token_ids[len(token_ids) - n:]))
            if start is not None:
                return list(token_ids[start:start + k])
        if self.shared is not None:
            for n in range(top, self.lo - 1, -1):
                follow = self.shared[n].get(tuple(token_ids[len(token_ids) - n:]))
                if follow:
                    return list(follow[:k])
        return []

    def forget(self, seq_id: int) -> None:
        entry = self._index.pop(seq_id, None)
        toks = self._tokens.pop(seq_id, None)
        if self.shared is None or entry is None or toks is None:
            return
        for n, table in entry[1].items():          # latest occurrence wins, as in one sequence
            shared = self.shared[n]
            for gram, start in table.items():
                shared[gram] = tuple(toks[start:start + 8])
                shared.move_to_end(gram)
            while len(shared) > self.shared_entries:
                shared.popitem(last=False)
