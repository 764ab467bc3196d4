"""Text <-> token ids: the SentencePiece tokenizer, tokenizer.json (byte-level BPE), streaming
detokenization and chat templates. ``get_tokenizer`` picks the one a directory holds."""
from __future__ import annotations

import os

from engine.errors import CheckpointError


def get_tokenizer(path: str, explicit: bool = False):
    """The tokenizer of directory ``path``: ``tokenizer.model`` (sentencepiece, preferred) or
    ``tokenizer.json`` (byte-level BPE: SmolLM2, ...); None when it has neither. ``explicit``
    (the caller named this directory as the tokenizer): having neither is an error. A
    checkpoint with tokenizer files but neither is refused, never run without text."""
    path = str(path)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
        return Tokenizer.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        from engine.tokenizer.tokenizer_json import JsonTokenizer
        return JsonTokenizer.from_pretrained(path)
    if explicit:
        raise ValueError(f"tokenizer={path!r}: no tokenizer.model or tokenizer.json in that directory")
    refuse_tokenizer_without_model(path)
    return None


def refuse_tokenizer_without_model(path: str) -> None:
    """A checkpoint with tokenizer files but no tokenizer.model would silently run
    without text: say what is missing instead."""
    names = ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")
    present = [n for n in names if os.path.isfile(os.path.join(path, n))]
    if present:
        raise CheckpointError(f"the checkpoint has tokenizer files ({', '.join(present)}) but no "
                              "tokenizer.model (sentencepiece) or tokenizer.json (byte-level BPE); copy one "
                              "in, pass tokenizer=DIR, or pass skip_tokenizer_init=True to give "
                              "prompts as token ids", file=os.path.join(path, "tokenizer.model"))
