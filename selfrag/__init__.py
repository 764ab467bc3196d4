"""Self-RAG on top of the engine: reflection-token grammar, adaptive retrieval,
passage-parallel critique scoring and beam-style segment decoding.

    from engine import LLM
    from selfrag import SelfRAG, Passage
    rag = SelfRAG(LLM("/models/selfrag_llama2_7b"), retriever=None)
    result = rag.answer("Who wrote Hamlet?", passages=[Passage("Hamlet", "...")])
"""


def __getattr__(name):
    # Lazy: `import selfrag.tokens` must not pull in torch.
    if name == "SelfRAG":
        from selfrag.pipeline import SelfRAG
        return SelfRAG
    if name in ("Passage", "Scores", "Candidate", "Result"):
        from selfrag import types
        return getattr(types, name)
    if name in ("default_model_dir", "random_model_dir"):   # the trained / random embedded models
        from selfrag import default_model
        return getattr(default_model, name)
    if name in ("selfrag_model_dir", "selfrag_smollm2_dir"):  # the default: the Self-RAG SmolLM2
        from selfrag import smollm2
        return getattr(smollm2, name)
    raise AttributeError(name)


__all__ = ["SelfRAG", "Passage", "Scores", "Candidate", "Result", "default_model_dir",
           "random_model_dir", "selfrag_model_dir", "selfrag_smollm2_dir"]
