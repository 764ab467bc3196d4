"""Text <-> token ids: the SentencePiece tokenizer, tokenizer.json (byte-level BPE),
streaming detokenization and chat templates."""
