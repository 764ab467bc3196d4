"""Text <-> token ids: the SentencePiece tokenizer, tokenizer.json (byte-level BPE), streaming
detokenization and chat templates. ``get_tokenizer`` picks the one a directory holds."""
from __future__ import annotations

import os


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
    from engine.core.request_validation import refuse_tokenizer_without_model
    refuse_tokenizer_without_model(path)
    return None
