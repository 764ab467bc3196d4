"""Pydantic models of the OpenAI-compatible API (requests validated, responses plain dicts).

OpenAI fields this server does not implement but that would change the answer
(``tools``, ``response_format``, ``best_of``, ...) are refused with a
400 naming them (``unsupported_fields``) when set to anything but their neutral
value; fields that only describe the client (``user``, ``metadata``, ``store``, ...)
and unknown ones are accepted and ignored. ``stream_options.include_usage`` is honoured.
"""
from __future__ import annotations

import time
import uuid
from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")      # extras are checked by unsupported_fields


# OpenAI request fields that would change results and are not implemented here, each with
# the values that change nothing (a client may send those).
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, False, True),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "best_of": (None, 1), "suffix": (None, ""),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
}


def unsupported_fields(req: BaseModel) -> list[str]:
    """Names of request fields set to something this server cannot honour."""
    extra = req.model_extra or {}
    return [name for name, neutral in UNSUPPORTED.items()
            if name in extra and extra[name] not in neutral]


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class _SamplingFields(_Lenient):
    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = -1
    stop: Optional[Union[StrictStr, List[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    n: StrictInt = Field(default=1, ge=1, le=64)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    skip_special_tokens: StrictBool = True
    ignore_eos: StrictBool = False
    # OpenAI's penalties and bias, vLLM's extensions; checked again by SamplingParams
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    min_tokens: StrictInt = 0
    min_p: float = 0.0
    bad_words: Optional[List[StrictStr]] = None
    include_stop_str_in_output: StrictBool = False


TokenIds = List[StrictInt]


class CompletionRequest(_SamplingFields):
    prompt: Union[StrictStr, List[StrictStr], TokenIds, List[TokenIds]]
    # echo: the prompt comes back before the completion, with its log-probs when
    # logprobs is set (max_tokens=0 then scores the prompt, as OpenAI's legacy API did)
    echo: StrictBool = False
    max_tokens: Optional[StrictInt] = Field(default=None, ge=0)
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)


class ContentPart(_Lenient):
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(_Lenient):
    role: StrictStr
    content: Optional[Union[StrictStr, List[ContentPart]]] = None


class ChatCompletionRequest(_SamplingFields):
    messages: List[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)


class PassageIn(_Lenient):
    title: StrictStr = ""
    text: StrictStr


class SelfRAGRequest(_Lenient):
    model: Optional[StrictStr] = None
    stream: StrictBool = False
    question: StrictStr = Field(min_length=1)
    passages: Optional[List[PassageIn]] = None
    k: StrictInt = Field(default=10, ge=1, le=100)
    task: Optional[StrictStr] = None
    mode: Literal["adaptive", "always", "never"] = "adaptive"
    threshold: float = 0.2
    rule: Literal["paper", "reference"] = "paper"
    w_rel: float = 1.0
    w_sup: float = 1.0
    w_use: float = 0.5
    use_seqscore: StrictBool = True
    constrained: StrictBool = True
    max_tokens: StrictInt = Field(default=100, ge=1)
    long: StrictBool = False
    beam_width: StrictInt = Field(default=2, ge=1, le=8)
    max_depth: StrictInt = Field(default=7, ge=1, le=16)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
