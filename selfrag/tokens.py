"""The Self-RAG added tokens (strings only; ids always come from tokenizer files).

In the released ``selfrag/selfrag_llama2_7b`` checkpoint these 16 strings are
appended, in this order, after the 32000-piece Llama-2 vocabulary (ids
32000-32015).  The first 15 are "additional special tokens" (reflection and
markup tokens); the last one, ``<pad>``, is the pad token.
"""

NO_RETRIEVAL = "[No Retrieval]"
RETRIEVAL = "[Retrieval]"
CONTINUE_RETRIEVAL = "[Continue to Use Evidence]"
IRRELEVANT = "[Irrelevant]"
RELEVANT = "[Relevant]"
PARAGRAPH_START = "<paragraph>"
PARAGRAPH_END = "</paragraph>"
UTILITY_TOKENS = [f"[Utility:{i}]" for i in range(1, 6)]
FULLY_SUPPORTED = "[Fully supported]"
PARTIALLY_SUPPORTED = "[Partially supported]"
NO_SUPPORT = "[No support / Contradictory]"
PAD = "<pad>"

# Groups of reflection tokens, as used by Self-RAG's critique scoring.
RETRIEVAL_TOKENS = [NO_RETRIEVAL, RETRIEVAL, CONTINUE_RETRIEVAL]
RELEVANCE_TOKENS = [IRRELEVANT, RELEVANT]
GROUNDNESS_TOKENS = [FULLY_SUPPORTED, PARTIALLY_SUPPORTED, NO_SUPPORT]
SUPPORT_TOKENS = GROUNDNESS_TOKENS
CTRL_TOKENS = [
    *RETRIEVAL_TOKENS, *RELEVANCE_TOKENS, *GROUNDNESS_TOKENS, *UTILITY_TOKENS,
]
PARAGRAPH_TOKENS = [PARAGRAPH_START, PARAGRAPH_END]

# Exact order of the added vocabulary (ids base_vocab + 0 ... base_vocab + 15).
ADDED_TOKENS = [
    NO_RETRIEVAL,
    RETRIEVAL,
    CONTINUE_RETRIEVAL,
    IRRELEVANT,
    RELEVANT,
    PARAGRAPH_START,
    PARAGRAPH_END,
    *UTILITY_TOKENS,
    FULLY_SUPPORTED,
    PARTIALLY_SUPPORTED,
    NO_SUPPORT,
    PAD,
]
# The 15 tokens listed as ``additional_special_tokens`` (everything but <pad>).
ADDITIONAL_SPECIAL_TOKENS = ADDED_TOKENS[:-1]

assert len(ADDED_TOKENS) == 16 and len(set(ADDED_TOKENS)) == 16
