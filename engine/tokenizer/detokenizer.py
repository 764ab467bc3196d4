"""Streaming detokenization: turn generated ids into text deltas, O(1) per token.

The state is just the text emitted so far and the bytes of an unfinished
byte-fallback run, so no step ever re-decodes earlier output.

Invariant (checked in tests/test_tokenizer.py against Hugging Face): after any
step where no byte-fallback character is half finished, ``"".join(deltas)``
equals ``tokenizer.decode(generated_ids, skip_special_tokens=...)``.

* Byte-fallback pieces (``<0xE2>`` ...) are held back until they form a whole
  UTF-8 character, so a multi-byte character is never split across deltas.
* Leading space: HF's decoder strips one leading space from the decoded text,
  so the first generated token ``"▁The"`` yields ``"The"``.  When
  ``prompt_token_ids`` is given (and holds a token that is not skipped) the
  output is a continuation of the prompt, as in vLLM, and the space is kept:
  deltas then join to ``decode(prompt + gen)[len(decode(prompt)):]``.
* Skipped special tokens vanish before byte runs are joined (as in HF), so
  they do not interrupt a multi-byte character.

Known corner where HF differs: HF turns a byte run that is not valid UTF-8
into one U+FFFD *per byte of the whole run*, even the bytes of valid
characters already inside that run (e.g. ``<0xC3><0xA9><0xFF>`` decodes to
"���" in HF, while this class has already emitted "é" and then adds "�").
A model only produces such runs by emitting malformed UTF-8.
"""

from __future__ import annotations

from typing import Iterable

_INCOMPLETE = "unexpected end of data"


class _TextSoFar:
    """The emitted deltas, joined lazily: ``text`` stays O(1) amortized per token."""

    _parts: list[str]

    @property
    def text(self) -> str:
        """All text emitted so far (excludes held-back partial characters)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


class IncrementalDetokenizer(_TextSoFar):
    """Feed generated ids one at a time with :meth:`add`; read :attr:`text`."""

    def __init__(self, tokenizer, prompt_token_ids: Iterable[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._parts: list[str] = []
        self._pending = bytearray()
        # Whether raw text has already started (then no leading space is stripped).
        self._started = not tokenizer.add_prefix_space or any(
            not self._skipped(i) for i in (prompt_token_ids or ())
        )

    def _skipped(self, token_id: int) -> bool:
        return self.skip_special_tokens and self.tokenizer.is_special_id(token_id)

    def _emit(self, s: str) -> str:
        if s and not self._started:
            self._started = True
            if s.startswith(" "):
                s = s[1:]
        if s:
            self._parts.append(s)
        return s

    def _flush_pending(self) -> str:
        if not self._pending:
            return ""
        s = "\ufffd" * len(self._pending)
        self._pending.clear()
        return self._emit(s)

    def add(self, token_id: int) -> str:
        """Consume one generated id; return the newly completed text ("" if none)."""
        if self._skipped(token_id):
            return ""
        b = self.tokenizer.token_byte(token_id)
        if b is None:
            out = self._flush_pending()  # an unfinished character ends here: U+FFFD per byte
            return out + self._emit(self.tokenizer.token_text(token_id))
        self._pending.append(b)
        try:
            s = self._pending.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == _INCOMPLETE and e.start == 0:
                return ""  # hold back: the character is not finished yet
            s = "\ufffd" * len(self._pending)
        self._pending.clear()
        return self._emit(s)

    def flush(self) -> str:
        """End of generation: emit held-back bytes (as U+FFFD, like HF) and return them."""
        return self._flush_pending()


class ByteLevelDetokenizer(_TextSoFar):
    """Streaming text for byte-level BPE (``engine.tokenizer.tokenizer_json``): every id stands for
    bytes, and one incremental UTF-8 decoder turns them into text, holding back the
    bytes of an unfinished character. Invalid bytes become U+FFFD per maximal invalid
    sequence, the rule of Rust's ``from_utf8_lossy`` that HF's ByteLevel decoder uses.
    An added token (``<|im_end|>``) is its text; a character left unfinished before it
    is flushed as U+FFFD first. No leading space is ever stripped."""

    def __init__(self, tokenizer, prompt_token_ids: Iterable[int] | None = None,
                 skip_special_tokens: bool = True):
        import codecs
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []

    def _emit(self, s: str) -> str:
        if s:
            self._parts.append(s)
        return s

    def add(self, token_id: int) -> str:
        if self.skip_special_tokens and self.tokenizer.is_special_id(token_id):
            return ""
        b = self.tokenizer.token_bytes(token_id)
        if b is None:
            return self.flush() + self._emit(self.tokenizer.token_text(token_id))
        return self._emit(self._decoder.decode(b))

    def flush(self) -> str:
        return self._emit(self._decoder.decode(b"", final=True))


def make_detokenizer(tokenizer, prompt_token_ids: Iterable[int] | None = None,
                     skip_special_tokens: bool = True):
    """The streaming detokenizer that fits ``tokenizer``'s kind of vocabulary."""
    cls = ByteLevelDetokenizer if hasattr(tokenizer, "token_bytes") else IncrementalDetokenizer
    return cls(tokenizer, prompt_token_ids, skip_special_tokens)
