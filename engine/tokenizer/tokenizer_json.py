"""A byte-level BPE tokenizer from ``tokenizer.json``, encoding exactly like Hugging Face.

``JsonTokenizer.from_pretrained(model_dir)`` wraps the HF ``tokenizers`` library (the
same Rust code that ``AutoTokenizer`` runs) and reads the special tokens the way
transformers does: ``bos_token`` / ``eos_token`` / ``unk_token`` / ``pad_token`` from
``tokenizer_config.json`` (a string or an ``{"content": ...}`` dict), falling back to
the ids in ``config.json``; the end-of-turn id that generation stops at comes from
``generation_config.json`` when it names one (SmolLM2's chat turns end at
``<|im_end|>``). BOS/EOS are added by the file's own post-processor, as in HF.

Only byte-level vocabularies (a ``ByteLevel`` decoder: GPT-2, Llama 3, SmolLM, ...) are
served by this class; SentencePiece models use ``engine.tokenizer.sentencepiece_tokenizer.Tokenizer``
(``tokenizer.model``). For streaming, every id maps to the bytes it stands for
(``token_bytes``), so ``engine.tokenizer.detokenizer`` can hold back an unfinished UTF-8 character.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Iterable

from engine.errors import CheckpointError
from engine.tokenizer.sentencepiece_tokenizer import SpecialTokenIds


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted: each of the 256 bytes is
    spelled by one character (printable Latin-1 bytes by themselves, the rest by
    code points from 256 up, in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read JSON: {e}", file=path) from None
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", file=path)
    return data


class JsonTokenizer(SpecialTokenIds):
    """The subset of the HF tokenizer API the engine uses, over ``tokenizers.Tokenizer``."""

    add_prefix_space = False        # byte-level decoding keeps every space

    def __init__(self, tok, config: dict, model_config: dict, generation_config: dict, path: str):
        self._tok = tok
        self.path = path
        decoder = json.loads(tok.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", ())}
        if "ByteLevel" not in kinds:
            raise CheckpointError(f"tokenizer.json's decoder is {decoder.get('type')!r}; only byte-level "
                                  "(ByteLevel) vocabularies are supported from tokenizer.json "
                                  "(SentencePiece models: give tokenizer.model)", file=path)
        self._added = {a.content: i for i, a in tok.get_added_tokens_decoder().items()}
        self._special_ids = {i for i, a in tok.get_added_tokens_decoder().items() if a.special}
        names = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            name = _token_name(config.get(key))
            if name is None and model_config.get(f"{key}_id") is not None:
                tid = model_config[f"{key}_id"]
                name = tok.id_to_token(tid[0] if isinstance(tid, list) else tid)
            names[key] = name
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        self.unk_token, self.pad_token = names["unk_token"], names["pad_token"]
        gen_eos = generation_config.get("eos_token_id")
        if isinstance(gen_eos, list):
            gen_eos = gen_eos[0] if gen_eos else None
        self._gen_eos = gen_eos if isinstance(gen_eos, int) else None
        self.chat_template = config.get("chat_template")
        byte_of = _unicode_to_byte()
        self._bytes: list[bytes | None] = []
        for i in range(tok.get_vocab_size(with_added_tokens=True)):
            piece = tok.id_to_token(i)
            if piece is None:
                self._bytes.append(b"")
            elif i in self._special_ids or piece in self._added:
                self._bytes.append(None)
            else:
                self._bytes.append(bytes(byte_of[c] for c in piece if c in byte_of))

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "JsonTokenizer":
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ImportError("this checkpoint's tokenizer.json needs HF's 'tokenizers' library: "
                              "pip install 'selfrag-engine[hf-models]' (or: pip install tokenizers)") from None
        d = os.fspath(model_dir)
        path = os.path.join(d, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {d}")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:          # the Rust side raises plain Exceptions
            raise CheckpointError(f"cannot load tokenizer.json: {e}", file=path) from None
        return cls(tok, _read(os.path.join(d, "tokenizer_config.json")), _read(os.path.join(d, "config.json")),
                   _read(os.path.join(d, "generation_config.json")), path)

    # ------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """generation_config.json's end of turn if it names one, else the eos_token."""
        return self._gen_eos if self._gen_eos is not None else self._id_of(self.eos_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Every id ``skip_special_tokens`` drops: the added tokens marked special (HF's
        own list names only bos/eos/unk/pad and the extra special tokens)."""
        return sorted(self._special_ids)

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return dict(self._added)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    # ------------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def is_special_id(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a vocabulary token stands for; None for an added token (its text
        is ``token_text``)."""
        token_id = int(token_id)
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""
