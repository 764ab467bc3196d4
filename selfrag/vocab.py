"""Token ids of the Self-RAG reflection and markup tokens, read from a tokenizer.

Nothing here hard-codes an id: ``ReflectionVocab.from_tokenizer`` looks every
string of ``selfrag.tokens`` up with ``convert_tokens_to_ids`` and checks the
answer (a Llama tokenizer maps unknown strings to ``<unk>`` instead of failing,
so an id equal to the unk id, or one that does not map back to the same
string, means the tokenizer lacks the token).  Works with ``engine.tokenizer.sentencepiece_tokenizer.
Tokenizer`` and with Hugging Face tokenizers alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfrag import tokens as T


def _lookup(tokenizer, token: str) -> int | None:
    """The id of ``token`` as one vocabulary entry, or None if the tokenizer lacks it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or isinstance(tid, bool) or not isinstance(tid, int):
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None):
        return None
    back = getattr(tokenizer, "convert_ids_to_tokens", None)
    if back is not None:
        try:
            if back(tid) != token:
                return None
        except (ValueError, IndexError, KeyError):
            return None
    return tid


@dataclass(frozen=True)
class ReflectionVocab:
    """Ids of the 15 reflection/markup tokens, ``<pad>`` and ``</s>``."""

    retrieval: int
    no_retrieval: int
    continue_evidence: int
    relevant: int
    irrelevant: int
    fully: int
    partially: int
    no_support: int
    utility: list[int]          # [Utility:1] ... [Utility:5], in that order
    paragraph_open: int
    paragraph_close: int
    pad: int
    eos: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ReflectionVocab":
        """Read the ids; ValueError naming every missing token (e.g. a plain Llama tokenizer)."""
        wanted = [*T.ADDED_TOKENS]
        ids = {tok: _lookup(tokenizer, tok) for tok in wanted}
        missing = [tok for tok in wanted if ids[tok] is None]
        if missing:
            raise ValueError(
                "the tokenizer lacks the Self-RAG token(s) " + ", ".join(repr(t) for t in missing)
                + " (is this a plain Llama tokenizer? load the tokenizer of a Self-RAG checkpoint)")
        eos = getattr(tokenizer, "eos_token_id", None)
        if not isinstance(eos, int):
            raise ValueError(f"the tokenizer has no eos token id (got {eos!r})")
        by_id: dict[int, list[str]] = {}
        for tok, tid in ids.items():
            by_id.setdefault(tid, []).append(tok)
        clash = [toks for toks in by_id.values() if len(toks) > 1]
        if clash or eos in by_id:
            raise ValueError(f"Self-RAG tokens share ids: {clash or by_id[eos] + ['eos']}")
        return cls(
            retrieval=ids[T.RETRIEVAL], no_retrieval=ids[T.NO_RETRIEVAL],
            continue_evidence=ids[T.CONTINUE_RETRIEVAL],
            relevant=ids[T.RELEVANT], irrelevant=ids[T.IRRELEVANT],
            fully=ids[T.FULLY_SUPPORTED], partially=ids[T.PARTIALLY_SUPPORTED], no_support=ids[T.NO_SUPPORT],
            utility=[ids[t] for t in T.UTILITY_TOKENS],
            paragraph_open=ids[T.PARAGRAPH_START], paragraph_close=ids[T.PARAGRAPH_END],
            pad=ids[T.PAD], eos=eos,
        )

    # ------------------------------------------------------------------ groups
    @property
    def retrieval_group(self) -> list[int]:
        """[No Retrieval], [Retrieval], [Continue to Use Evidence]."""
        return [self.no_retrieval, self.retrieval, self.continue_evidence]

    @property
    def relevance_group(self) -> list[int]:
        """[Irrelevant], [Relevant]."""
        return [self.irrelevant, self.relevant]

    @property
    def support_group(self) -> list[int]:
        """[Fully supported], [Partially supported], [No support / Contradictory]."""
        return [self.fully, self.partially, self.no_support]

    @property
    def utility_group(self) -> list[int]:
        return list(self.utility)

    @property
    def scored_ids(self) -> list[int]:
        """Every id the scores read (pass as ``SamplingParams(logprob_token_ids=...)``).

        [Retrieval], [No Retrieval], the relevance, support and utility tokens:
        12 ids, sorted.
        """
        return sorted({self.retrieval, self.no_retrieval, *self.relevance_group,
                       *self.support_group, *self.utility})

    @property
    def reflection_ids(self) -> list[int]:
        """All 15 reflection/markup ids, in ``tokens.ADDITIONAL_SPECIAL_TOKENS`` order."""
        return [self.no_retrieval, self.retrieval, self.continue_evidence, self.irrelevant, self.relevant,
                self.paragraph_open, self.paragraph_close, *self.utility,
                self.fully, self.partially, self.no_support]
