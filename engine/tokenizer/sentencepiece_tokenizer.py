"""A Llama (SentencePiece BPE) tokenizer that encodes exactly like Hugging Face.

``Tokenizer.from_pretrained(model_dir)`` reads ``tokenizer.model`` with the
``sentencepiece`` library and the added/special tokens from
``tokenizer_config.json`` (``added_tokens_decoder``), ``special_tokens_map.json``
and ``added_tokens.json``.  Nothing here knows which tokens a model adds.

How transformers 5 (checked on 5.17 and 5.24) encodes with ``LlamaTokenizer``
built from a ``tokenizer.model``-only directory, which this class reproduces:

1. The text is split on added tokens (leftmost-longest match on the raw text;
   ``lstrip``/``rstrip`` tokens swallow neighbouring whitespace).  An added
   token always becomes its own id, also ``<s>``/``</s>`` typed in a prompt.
2. Every other chunk goes through a ``Metaspace`` pre-tokenizer: spaces become
   "▁" and a "▁" is prepended unless the chunk already starts with one.  With
   ``legacy: true`` that happens for every chunk (prepend_scheme "always");
   with ``legacy: false`` (also the default when the key is absent) only for
   a chunk starting at offset 0 of the text (prepend_scheme "first"), so text
   right after a special token gets no leading "▁".  ``add_prefix_space:
   false`` disables the prepend entirely.  Note HF never doubles the prefix:
   ``"  two"`` -> "▁▁two", while SentencePiece itself would give "▁▁▁two".
3. The chunk is BPE-encoded with byte fallback (here: SentencePiece with its
   dummy prefix switched off, since step 2 already did it).
4. ``<s>`` is prepended if ``add_bos_token`` and ``</s>`` appended if
   ``add_eos_token``.  HF treats a missing ``add_bos_token`` key as *false*.

Decoding mirrors HF's decoder chain: pieces ("▁" -> " "), runs of byte pieces
become UTF-8 (a run that is not valid UTF-8 yields one U+FFFD per byte), added
tokens contribute their content, and one leading space of the whole result is
stripped (when the prefix space is enabled).

Only directories with a ``tokenizer_config.json`` naming ``LlamaTokenizer``
are guaranteed to match: without that file AutoTokenizer falls back to a
generic ``TokenizersBackend`` with other rules (e.g. no BOS), not mirrored here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from engine.errors import CheckpointError, read_json

SPIECE_UNDERLINE = "\u2581"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class AddedToken:
    """One entry of the added vocabulary (mirrors ``tokenizers.AddedToken``)."""

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


def _read_json(path: Path):
    """The parsed file, or None when it does not exist."""
    return read_json(path, "tokenizer JSON") if path.is_file() else None


def _token_str(value) -> str | None:
    """A special token entry is a string or an AddedToken-like dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read special token entry {value!r}")


class SpecialTokenIds:
    """The ids of the named special tokens (``bos_token`` ... as strings on the instance),
    shared by both tokenizer backends."""

    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.convert_tokens_to_ids(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)


class Tokenizer(SpecialTokenIds):
    """Llama SentencePiece tokenizer plus an added vocabulary (HF-compatible)."""

    def __init__(
        self,
        model_file: str | os.PathLike,
        added_tokens: Iterable[AddedToken] = (),
        *,
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        unk_token: str | None = "<unk>",
        pad_token: str | None = None,
        additional_special_tokens: Iterable[str] = (),
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool = False,
        add_prefix_space: bool = True,
    ):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        model_file = Path(model_file)
        if not model_file.is_file():
            raise CheckpointError("tokenizer.model not found", file=str(model_file))
        try:
            proto = pb.ModelProto()
            proto.ParseFromString(model_file.read_bytes())
            # The Metaspace step below adds the prefix "▁" itself, the HF way.
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except Exception as e:  # protobuf / sentencepiece raise assorted types
            raise CheckpointError(f"cannot load SentencePiece model: {e}", file=str(model_file)) from e

        self._pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        self._piece_to_id = {p: i for i, p in enumerate(self._pieces)}
        self._byte_of = {}
        for i, p in enumerate(self._pieces):
            m = _BYTE_PIECE.match(p) if self._sp.is_byte(i) else None
            if m:
                self._byte_of[i] = int(m.group(1), 16)

        self.legacy = bool(legacy)
        self.add_prefix_space = bool(add_prefix_space)
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.additional_special_tokens = list(additional_special_tokens)

        # Added vocabulary: explicit entries first, then named special tokens
        # that are neither in it nor in the base vocab (HF appends those).
        self._added: dict[str, AddedToken] = {}
        self._added_by_id: dict[int, AddedToken] = {}
        for tok in sorted(added_tokens, key=lambda t: t.id):
            self._register(tok)
        named = [bos_token, eos_token, unk_token, pad_token, *self.additional_special_tokens]
        for content in named:
            if content is not None and content not in self._added:
                tok_id = self._piece_to_id.get(content, self.vocab_size)
                self._register(AddedToken(content, tok_id, special=True))
        self._special_ids = {t.id for t in self._added_by_id.values() if t.special}
        by_length = sorted(self._added, key=len, reverse=True)
        self._split_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None

    def _register(self, tok: AddedToken) -> None:
        if tok.content in self._added:
            return
        self._added[tok.content] = tok
        self._added_by_id.setdefault(tok.id, tok)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Tokenizer":
        """Load from an HF-style tokenizer directory (see module docstring)."""
        d = Path(model_dir)
        model_file = d / "tokenizer.model"
        if not model_file.is_file():
            raise CheckpointError("tokenizer.model not found", file=str(model_file))
        config = _read_json(d / "tokenizer_config.json") or {}
        special_map = _read_json(d / "special_tokens_map.json") or {}
        added_json = _read_json(d / "added_tokens.json") or {}
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map),
                          ("added_tokens.json", added_json)):
            if not isinstance(obj, dict):
                raise CheckpointError("expected a JSON object", file=str(d / name))

        try:
            extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
            extra = [_token_str(t) for t in extra] if isinstance(extra, list) else []
            added: list[AddedToken] = []
            if "added_tokens_decoder" in config:
                # HF then ignores special_tokens_map.json entirely.
                names = {k: _token_str(config.get(k)) for k in _SPECIAL_KEYS}
                for idx, entry in config["added_tokens_decoder"].items():
                    if isinstance(entry, str):
                        entry = {"content": entry}
                    added.append(AddedToken(
                        entry["content"], int(idx), special=bool(entry.get("special", False)),
                        lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                    ))
            else:
                # Older layout: special_tokens_map.json overrides the config's
                # named tokens; an added_tokens.json entry is special only if it
                # is a named token or in the *config's* extra tokens (HF 5
                # ignores the map's additional_special_tokens here).
                names = {k: _token_str(special_map.get(k, config.get(k))) for k in _SPECIAL_KEYS}
                specials = {v for v in names.values() if v} | set(extra)
                added = [AddedToken(t, int(i), special=t in specials) for t, i in added_json.items()]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"malformed tokenizer config: {e}", file=str(d / "tokenizer_config.json")) from e

        defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        for k, v in defaults.items():
            if names[k] is None and k not in config and k not in special_map:
                names[k] = v
        prefix = config.get("add_prefix_space")
        return cls(
            model_file,
            added,
            **names,
            additional_special_tokens=extra,
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            legacy=bool(config.get("legacy", False)),
            add_prefix_space=True if prefix is None else bool(prefix),
        )

    # --------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Base pieces plus added tokens (== ``len(tokenizer)``)."""
        return max(len(self._pieces), max(self._added_by_id, default=-1) + 1)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens and ``additional_special_tokens``."""
        names = [self.bos_token, self.eos_token, self.unk_token, self.pad_token, *self.additional_special_tokens]
        out: list[int] = []
        for n in names:
            if n is not None and (i := self._id_of(n)) not in out:
                out.append(i)
        return out

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """Added token content -> id (including the base-vocab specials HF lists)."""
        return {t.content: t.id for t in sorted(self._added.values(), key=lambda t: t.id)}

    # --------------------------------------------------------------- conversion
    def convert_tokens_to_ids(self, tokens):
        """Token string(s) -> id(s); unknown strings map to the unk id, as in HF."""
        if isinstance(tokens, str):
            if tokens in self._added:
                return self._added[tokens].id
            return self._piece_to_id.get(tokens, self._piece_to_id.get(self.unk_token or "", None))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        """Id(s) -> token string(s) (SentencePiece pieces or added content)."""
        if isinstance(ids, int) or hasattr(ids, "__index__"):
            i = int(ids)
            if i in self._added_by_id:
                return self._added_by_id[i].content
            if 0 <= i < len(self._pieces):
                return self._pieces[i]
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return [self.convert_ids_to_tokens(i) for i in ids]

    # ------------------------------------------------------------------- encode
    def _split_added(self, text: str) -> list[tuple[str, int] | AddedToken]:
        """Split ``text`` into (chunk, offset) pairs and AddedToken matches."""
        out: list = []
        pos = 0
        matches = list(self._split_re.finditer(text)) if self._split_re else []
        for m in matches:
            tok = self._added[m.group()]
            start, end = m.start(), m.end()
            if start < pos:  # whitespace already swallowed by an rstrip token
                continue
            if tok.lstrip:
                while start > pos and text[start - 1].isspace():
                    start -= 1
            out.append((text[pos:start], pos))
            out.append(tok)
            pos = end
            if tok.rstrip:
                while pos < len(text) and text[pos].isspace():
                    pos += 1
        out.append((text[pos:], pos))
        return out

    def _encode_chunk(self, chunk: str, offset: int) -> list[int]:
        if not chunk:
            return []
        s = chunk.replace(" ", SPIECE_UNDERLINE)
        prepend = self.add_prefix_space and (self.legacy or offset == 0)
        if prepend and not s.startswith(SPIECE_UNDERLINE):
            s = SPIECE_UNDERLINE + s
        return self._sp.encode(s)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, identical to ``AutoTokenizer(...)(text)["input_ids"]``."""
        ids: list[int] = []
        for part in self._split_added(text):
            if isinstance(part, AddedToken):
                ids.append(part.id)
            else:
                ids.extend(self._encode_chunk(*part))
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    # ------------------------------------------------------------------- decode
    def token_byte(self, token_id: int) -> int | None:
        """The byte a byte-fallback piece (``<0xNN>``) stands for, else None."""
        token_id = int(token_id)
        return None if token_id in self._added_by_id else self._byte_of.get(token_id)

    def token_text(self, token_id: int) -> str:
        """What a non-byte token contributes to decoded text ("▁" -> " ")."""
        return self.convert_ids_to_tokens(int(token_id)).replace(SPIECE_UNDERLINE, " ")

    def is_special_id(self, token_id: int) -> bool:
        """True for ids that ``skip_special_tokens=True`` drops."""
        return int(token_id) in self._special_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text, like HF ``decode(ids, skip_special_tokens=...)``."""
        if isinstance(ids, int):
            ids = [ids]
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if skip_special_tokens and self.is_special_id(i):
                continue  # removed before byte runs are joined, as in HF
            b = self.token_byte(i)
            if b is not None:
                run.append(b)
                continue
            if run:
                parts.append(_bytes_to_text(run))
                run = bytearray()
            parts.append(self.token_text(i))
        if run:
            parts.append(_bytes_to_text(run))
        text = "".join(parts)
        if self.add_prefix_space and text.startswith(" "):
            text = text[1:]
        return text


def _bytes_to_text(run: bytearray) -> str:
    """HF ByteFallback: a run of byte pieces is valid UTF-8 or one U+FFFD per byte."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)
