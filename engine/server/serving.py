"""What the OpenAI routes share: one ``OpenAIServing`` per app, over the shared ``AsyncEngine``.

It turns request bodies into validated ``SamplingParams`` and admitted submissions (every
refusal an ``APIError`` with its HTTP status), and yields a submission's outputs as they
come. The routes themselves are in serving_completion.py and serving_chat.py.
"""
from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from engine.errors import EngineDeadError, InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.server.asgi import APIError
from engine.server.chat import ChatRenderer
from engine.server.errors import EngineDrainingError, QueueFullError
from engine.server.protocol import unsupported_fields

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIServing:
    """The app's serving state: the LLM, its ``AsyncEngine``, the served model name, the
    ``max_tokens`` cap, the tokenizer and the chat renderer."""

    def __init__(self, llm, engine, served_model_name: str, max_tokens_cap: int, chat_prompt=None):
        self.llm, self.engine = llm, engine
        self.served_model_name, self.max_tokens_cap = served_model_name, max_tokens_cap
        self.tokenizer = llm.get_tokenizer()
        self.render_chat = ChatRenderer(llm, chat_prompt)

    async def parse_body(self, request: Request, model):
        """The body validated by pydantic's own JSON parser (the hot routes are plain
        Starlette routes; see ``asgi.document_raw_routes``)."""
        try:
            req = model.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
        for name in unsupported_fields(req):
            raise APIError(400, f"{name!r} is not supported by this server", param=name,
                           code="unsupported_field")
        return req

    def check_fits(self, sub, max_tokens: int) -> None:
        """400 when a prompt plus max_tokens does not fit max_model_len (as vLLM does),
        instead of a silently shortened answer."""
        limit = self.llm.max_model_len
        for req in sub.reqs:
            n = req.seq.num_prompt_tokens
            if n + max_tokens > limit:
                self.engine.discard(sub)
                raise APIError(400, f"this model's maximum context length is {limit} "
                                    f"tokens; the request asks for {n + max_tokens} ({n} in the "
                                    f"prompt, {max_tokens} to generate): lower max_tokens",
                               param="max_tokens")

    def check_model(self, model) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"the model {model!r} does not exist (served: {self.served_model_name!r})",
                           "not_found_error", "model", "model_not_found")

    def sampling(self, req, max_tokens, logprobs, prompt_logprobs=None) -> SamplingParams:
        if max_tokens > self.max_tokens_cap:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's cap of "
                                f"{self.max_tokens_cap}", param="max_tokens")
        try:
            knobs = {k: v for k, v in (("presence_penalty", req.presence_penalty),
                                       ("frequency_penalty", req.frequency_penalty),
                                       ("repetition_penalty", req.repetition_penalty),
                                       ("logit_bias", req.logit_bias)) if v is not None}
            return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  max_tokens=max_tokens, stop=req.stop, seed=req.seed,
                                  logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
                                  ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, min_p=req.min_p,
                                  bad_words=req.bad_words,
                                  include_stop_str_in_output=req.include_stop_str_in_output, n=req.n,
                                  prompt_logprobs=prompt_logprobs, **knobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def prepare(self, prompts, params, rid):
        """Validates and admits the prompts (errors become HTTP statuses); ``outputs``
        queues them, after a streaming response has sent its headers."""
        try:
            return self.engine.prepare(prompts, params, rid)
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineDrainingError as e:
            raise APIError(503, str(e), "service_unavailable", code="draining") from None
        except EngineDeadError as e:            # the engine failed for good: every request 500s
            raise APIError(500, str(e), "server_error", code="engine_dead") from None
        except ValueError as e:                 # InvalidRequestError, PromptTooLongError, ...
            param = "prompt" if isinstance(e, InvalidRequestError) else None
            raise APIError(400, str(e), param=param) from None

    async def outputs(self, sub):
        """Queues ``sub`` and yields (index, RequestOutput) until all finish; aborts
        the rest on exit."""
        engine = self.engine
        index = {r: i for i, r in enumerate(sub.rids)}
        left = set(sub.rids)
        q = sub.queue
        try:
            engine.commit(sub)
            while left:
                items = [await q.get()]
                while not q.empty():        # this loop fell behind the engine: outputs are
                    items.append(q.get_nowait())   # cumulative, so only the latest counts
                latest, failure = {}, None
                for item in items:
                    if isinstance(item, BaseException):   # the tokens before it still go out
                        failure = item
                        break
                    for out in item:
                        latest[out.request_id] = out
                for rid, out in latest.items():
                    if out.error is not None:   # this request failed; the engine goes on
                        raise APIError(500, out.error, "server_error", code="request_failed")
                    if out.finished:
                        left.discard(rid)
                    yield index[rid], out
                if isinstance(failure, EngineDeadError):  # a failed step: 500, the server lives on
                    raise APIError(500, str(failure), "server_error", code="engine_error")
                if failure is not None:
                    raise failure
        finally:
            for r in left:
                engine.abort(r)
