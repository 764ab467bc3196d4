"""A Llama-2 inference engine with a paged KV cache and a vLLM-shaped API."""
from engine.errors import (CheckpointError, ConfigError, EngineDeadError, InvalidRequestError,
                           PromptTooLongError, RequestFailedError)
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams, SamplingParamsError


def __getattr__(name):
    # LLM pulls in torch; import it lazily so `engine.SamplingParams` stays light.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "CheckpointError", "ConfigError", "InvalidRequestError", "PromptTooLongError",
           "SamplingParamsError", "RequestFailedError", "EngineDeadError"]
