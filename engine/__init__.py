"""A Llama-2 inference engine with a paged KV cache and a vLLM-shaped API."""
from engine.errors import (
    CheckpointError,
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    RequestFailedError,
)
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams, SamplingParamsError

_LAZY = {"LLM": "engine.llm", "BeamSearchParams": "engine.sampling.beam_search",
         "BeamSearchOutput": "engine.sampling.beam_search", "BeamSearchSequence": "engine.sampling.beam_search"}


def __getattr__(name):
    # LLM pulls in torch; import it lazily so `engine.SamplingParams` stays light.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "RequestOutput",
           "CompletionOutput", "Logprob",
           "CheckpointError", "ConfigError", "InvalidRequestError", "PromptTooLongError",
           "SamplingParamsError", "RequestFailedError", "EngineDeadError"]
