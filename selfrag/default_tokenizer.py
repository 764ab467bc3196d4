"""Build a small Llama-2-style Self-RAG tokenizer directory for tests and demos.

``build_tokenizer(out_dir)`` trains a SentencePiece BPE model on
``selfrag/data/corpus.txt`` with the options Llama-2's ``tokenizer.model``
records in its ``trainer_spec``/``normalizer_spec`` (byte fallback, split
digits, dummy prefix, identity normalisation, no whitespace squashing,
whitespace-only pieces, ids 0/1/2 = <unk>/<s>/</s>, no pad piece), then writes
the Hugging Face side files in the layout of ``selfrag/selfrag_llama2_7b``:
the 16 Self-RAG tokens are appended after the base vocabulary.

Training is deterministic (single thread, no shuffling, no sampling, the
corpus is fed through an iterator so no file path ends up in the model) and
takes well under a second for the default vocabulary size.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from selfrag.tokens import ADDED_TOKENS, ADDITIONAL_SPECIAL_TOKENS, PAD

DEFAULT_CORPUS = Path(__file__).with_name("data") / "corpus.txt"
MODEL_MAX_LENGTH = 4096

# Options mirrored from Llama-2's tokenizer.model (trainer_spec / normalizer_spec).
_LLAMA2_SPM_OPTIONS = dict(
    model_type="bpe",
    character_coverage=0.99995,
    max_sentence_length=4192,
    max_sentencepiece_length=16,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    split_digits=True,
    treat_whitespace_as_suffix=False,
    allow_whitespace_only_pieces=True,
    byte_fallback=True,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    use_all_vocab=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
    unk_surface=" \u2047 ",
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    # Determinism: one thread, every sentence, fixed order.
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    self_test_sample_size=0,
    minloglevel=2,
)


def _added_token_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def build_tokenizer(
    out_dir: str | os.PathLike,
    vocab_size: int = 1000,
    corpus_path: str | os.PathLike | None = None,
    legacy: bool = False,
) -> None:
    """Train ``tokenizer.model`` and write the HF tokenizer files into ``out_dir``.

    Files written: ``tokenizer.model``, ``added_tokens.json`` (token -> id,
    ids ``vocab_size .. vocab_size + 15`` in ``ADDED_TOKENS`` order),
    ``special_tokens_map.json`` and ``tokenizer_config.json`` (with
    ``legacy`` set as given).  Same inputs always give the same bytes.
    ``vocab_size`` must leave room for the 259 byte/control pieces plus the
    corpus alphabet (about 360 for the default corpus); SentencePiece raises
    ``RuntimeError`` otherwise.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(corpus_path) if corpus_path is not None else DEFAULT_CORPUS
    lines = [ln for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, **_LLAMA2_SPM_OPTIONS
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())

    added = {tok: vocab_size + i for i, tok in enumerate(ADDED_TOKENS)}
    base_special = {0: "<unk>", 1: "<s>", 2: "</s>"}
    decoder = {str(i): _added_token_entry(t) for i, t in base_special.items()}
    decoder.update({str(i): _added_token_entry(t) for t, i in added.items()})

    special_map = {
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": PAD,
        "unk_token": "<unk>",
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": bool(legacy),
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    for name, obj in (
        ("added_tokens.json", added),
        ("special_tokens_map.json", special_map),
        ("tokenizer_config.json", config),
    ):
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
