"""The FastAPI app: OpenAI-compatible completions/chat over one ``AsyncEngine``.

    app = create_app(llm, served_model_name="selfrag")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` -> SSE ``data: {json}`` chunks
ending with ``data: [DONE]``). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: invalid requests 400,
bad key 401, unknown model 404, body too large 413, queue full 429 (with
``Retry-After``), draining 503, only server faults 500.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Callable

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the HTTP server needs FastAPI and uvicorn: pip install 'selfrag-engine[serve]' "
                      "(or pip install fastapi uvicorn)") from e

from engine.errors import InvalidRequestError
from engine.sampling.params import SamplingParams
from engine.server.asgi import (
    APIError,
    _document_raw_routes,
    _error_response,
    _LimitsMiddleware,
    _ServerApp,
    package_version,
)
from engine.server.async_engine import AsyncEngine, EngineDeadError, EngineDrainingError, QueueFullError
from engine.server.chat import ChatError, ChatRenderer, normalize_messages
from engine.server.logprobs_format import chat_logprobs, echo_part, joined, legacy_logprobs
from engine.server.protocol import ChatCompletionRequest, CompletionRequest, new_id, now_s, unsupported_fields, usage
from engine.server.streaming import ClientGone, EventStream, compact_json, sse, sse_prefix, watch_disconnect

log = logging.getLogger("engine.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS_CAP = 4096
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(llm, *, served_model_name: str = "selfrag", api_key: str | None = None,
               rag: Callable | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP, max_waiting: int | None = 1024,
               engine: AsyncEngine | None = None,
               chat_prompt: Callable[[list[dict]], str] | None = None) -> FastAPI:
    """The app serving ``llm`` (one shared ``AsyncEngine``, started on app startup).

    rag: optional ``install(app, engine)`` adding more routes (``selfrag.serve``
        passes one adding ``/v1/selfrag/answer``).
    max_tokens_cap: largest ``max_tokens`` accepted (400 above).
    max_waiting: requests waiting for their first token before 429.
    engine: an existing ``AsyncEngine`` over ``llm`` (default: a new one).
    chat_prompt: ``chat_prompt(messages) -> str`` renders a chat conversation
        when the checkpoint has no chat_template (``selfrag serve`` passes
        Self-RAG's instruction format); see engine/server/chat.py.
    """
    owns_engine = engine is None
    engine = engine or AsyncEngine(llm, max_waiting=max_waiting)
    tokenizer = llm.get_tokenizer()
    render_chat = ChatRenderer(llm, chat_prompt)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            if owns_engine:
                engine.begin_drain()
                engine.stop()

    app = _ServerApp(title="selfrag-engine OpenAI-compatible server", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.llm = llm
    app.state.served_model_name = served_model_name
    app.state.max_tokens_cap = max_tokens_cap
    app.state.api_error = APIError

    # ---- errors ------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, loc = "the body is not valid JSON", []
        else:
            msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{e.get('msg')}" for e in errs[:5])
        return _error_response(400, msg, param=".".join(loc) or None, code=first.get("type"))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, str(exc.detail), type_, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("server error")
        return _error_response(500, f"internal server error: {type(exc).__name__}", "server_error")

    # ---- helpers ----------------------------------------------------------------------
    async def parse_body(request: Request, model):
        """The body validated by pydantic's own JSON parser (the hot routes are plain
        Starlette routes; see ``_document_raw_routes``)."""
        try:
            req = model.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
        for name in unsupported_fields(req):
            raise APIError(400, f"{name!r} is not supported by this server", param=name,
                           code="unsupported_field")
        return req

    def check_fits(sub, max_tokens: int) -> None:
        """400 when a prompt plus max_tokens does not fit max_model_len (as vLLM does),
        instead of a silently shortened answer."""
        for req in sub.reqs:
            n = req.seq.num_prompt_tokens
            if n + max_tokens > llm.max_model_len:
                engine.discard(sub)
                raise APIError(400, f"this model's maximum context length is {llm.max_model_len} "
                                    f"tokens; the request asks for {n + max_tokens} ({n} in the "
                                    f"prompt, {max_tokens} to generate): lower max_tokens",
                               param="max_tokens")

    def check_model(model):
        if model is not None and model != served_model_name:
            raise APIError(404, f"the model {model!r} does not exist (served: {served_model_name!r})",
                           "not_found_error", "model", "model_not_found")

    def sampling(req, max_tokens, logprobs, prompt_logprobs=None) -> SamplingParams:
        if max_tokens > max_tokens_cap:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's cap of "
                                f"{max_tokens_cap}", param="max_tokens")
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

    def prepare(prompts, params, rid):
        """Validates and admits the prompts (errors become HTTP statuses); ``outputs``
        queues them, after a streaming response has sent its headers."""
        try:
            return engine.prepare(prompts, params, rid)
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

    async def outputs(sub):
        """Queues ``sub`` and yields (index, RequestOutput) until all finish; aborts
        the rest on exit."""
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

    # ---- routes -------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if llm.engine_error is not None:
            return JSONResponse({"status": "dead", "error": str(llm.engine_error)}, status_code=503)
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": package_version()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model",
                                            "created": now_s(), "owned_by": "selfrag-engine",
                                            "max_model_len": llm.max_model_len}]}

    async def completions(request: Request):
        req = await parse_body(request, CompletionRequest)
        check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [{"prompt_token_ids": list(p)}]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [{"prompt_token_ids": list(x)} for x in p]
        elif p and all(isinstance(x, str) for x in p):
            prompts = list(p)
        else:
            raise APIError(400, "prompt must be a non-empty string, list of strings, token-id list "
                                "or list of token-id lists", param="prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo: the prompt's log-probs)",
                           param="max_tokens")
        prompt_lps = (req.logprobs or 0) if req.echo and (req.logprobs is not None or max_tokens == 0) else None
        params = sampling(req, max_tokens, req.logprobs, prompt_lps)
        n = req.n
        cid = new_id("cmpl")
        sub = prepare(prompts, params, cid)
        check_fits(sub, params.max_tokens)
        rids = sub.rids
        watcher = watch_disconnect(request.receive, sub.queue)
        created, model = now_s(), served_model_name

        if not req.stream:
            finals = {}
            try:
                async for i, out in outputs(sub):
                    if out.finished:
                        finals[i] = out
            except ClientGone:
                return Response(status_code=499)   # nginx's 'client closed'; uvicorn drops it
            finally:
                watcher.cancel()
            choices, pt, ct = [], 0, 0
            for i in range(len(rids)):
                out = finals[i]
                pt += len(out.prompt_token_ids)
                head, head_lps = echo_part(out, req.logprobs is not None, tokenizer) if req.echo else ("", None)
                for j, c in enumerate(out.outputs):        # n completions of prompt i
                    ct += len(c.token_ids)
                    choices.append({"index": i * n + j, "text": head + c.text,
                                    "logprobs": joined(head_lps, legacy_logprobs(c, 0, len(head), tokenizer)),
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": choices, "usage": usage(pt, ct)})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            sent_text, sent_tok, echo_len, done = {}, {}, {}, set()
            pt = ct = 0
            prefix = sse_prefix({"id": cid, "object": "text_completion", "created": created, "model": model})
            async for i, out in outputs(sub):
                for j, c in enumerate(out.outputs):        # n completions of prompt i
                    k = i * n + j
                    if k in done:
                        continue
                    fin = c.finish_reason is not None
                    head, head_lps = ("", None)
                    if k not in sent_text:              # the first chunk of a choice echoes the prompt
                        sent_text[k] = sent_tok[k] = 0
                        if req.echo:
                            head, head_lps = echo_part(out, req.logprobs is not None, tokenizer)
                        echo_len[k] = len(head)
                    delta = c.text[sent_text[k]:]
                    if not delta and not head and not fin:
                        continue
                    choice = {"index": k, "text": head + delta,
                              "logprobs": joined(head_lps, legacy_logprobs(c, sent_tok[k], echo_len[k] + sent_text[k],
                                                                           tokenizer)),
                              "finish_reason": c.finish_reason if fin else None}
                    if fin:
                        choice["stop_reason"] = c.stop_reason
                        ct += len(c.token_ids)
                        done.add(k)
                    sent_text[k], sent_tok[k] = len(c.text), len(c.token_ids)
                    yield prefix + compact_json(choice) + "]}\n\n"
                if out.finished:
                    pt += len(out.prompt_token_ids)
            if include_usage:
                yield sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": usage(pt, ct)})
            yield "data: [DONE]\n\n"

        return EventStream(stream(), watcher, on_close=lambda: engine.discard(sub), headers=SSE_HEADERS)

    async def chat(request: Request):
        req = await parse_body(request, ChatCompletionRequest)
        check_model(req.model)
        try:
            prompt = render_chat(normalize_messages(req.messages))
        except ChatError as e:
            raise APIError(400, str(e), param=e.param) from None
        n_prompt = len(prompt["prompt_token_ids"])
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:               # as much as fits, up to the server's cap
            max_tokens = max(1, min(max_tokens_cap, llm.max_model_len - n_prompt))
        top = req.top_logprobs or 0
        params = sampling(req, max_tokens, top if req.logprobs else None)
        cid = new_id("chatcmpl")
        sub = prepare([prompt], params, cid)
        check_fits(sub, max_tokens)
        watcher = watch_disconnect(request.receive, sub.queue)
        created, model = now_s(), served_model_name

        if not req.stream:
            final = None
            try:
                async for _, out in outputs(sub):
                    final = out
            except ClientGone:
                return Response(status_code=499)   # nginx's 'client closed'; uvicorn drops it
            finally:
                watcher.cancel()
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": j, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": chat_logprobs(c, 0, bool(top)) if req.logprobs else None,
                                 "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                                for j, c in enumerate(final.outputs)],
                    "usage": usage(len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs))})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
            prefix = sse_prefix(head)
            yield sse({**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None} for j in range(req.n)]})
            sent_text, sent_tok, done = [0] * req.n, [0] * req.n, set()
            final = None
            async for _, out in outputs(sub):
                final = out
                for j, c in enumerate(out.outputs):        # n completions
                    fin = c.finish_reason is not None
                    delta = c.text[sent_text[j]:]
                    if j in done or (not delta and not fin):
                        continue
                    choice = {"index": j, "delta": {"content": delta} if delta else {},
                              "logprobs": chat_logprobs(c, sent_tok[j], bool(top)) if req.logprobs else None,
                              "finish_reason": c.finish_reason if fin else None}
                    sent_text[j], sent_tok[j] = len(c.text), len(c.token_ids)
                    if fin:
                        done.add(j)
                    yield prefix + compact_json(choice) + "]}\n\n"
            if include_usage and final is not None:
                yield sse({**head, "choices": [],
                           "usage": usage(len(final.prompt_token_ids),
                                          sum(len(c.token_ids) for c in final.outputs))})
            yield "data: [DONE]\n\n"

        return EventStream(stream(), watcher, on_close=lambda: engine.discard(sub), headers=SSE_HEADERS)

    # The two hot routes take the raw Request and parse their bodies with pydantic's
    # JSON parser: FastAPI's body dependency and route machinery took 0.19 ms of the
    # 0.65 ms from request to engine on the CPU VM. ``_document_raw_routes`` keeps
    # them in /openapi.json; ``_ServerApp`` also reaches them without the middleware.
    hot = {"/v1/completions": completions, "/v1/chat/completions": chat}
    for path, endpoint in hot.items():
        app.add_route(path, endpoint, methods=["POST"])
    _document_raw_routes(app, {"/v1/completions": ("Create a completion", CompletionRequest),
                               "/v1/chat/completions": ("Create a chat completion", ChatCompletionRequest)})
    if rag is not None:
        rag(app, engine)

    metrics = _metrics(llm, engine, {r.path for r in app.routes if hasattr(r, "path")})
    if metrics is not None:
        engine.observer = metrics

        @app.get("/metrics")
        async def prometheus_metrics():
            body, content_type = metrics.render()
            return Response(body, media_type=content_type)
    app.state.metrics = metrics

    # The key / size / draining gate: outermost for every request, direct or not.
    limits = {"api_key": api_key, "max_body_bytes": max_body_bytes, "engine": engine,
              "metrics": metrics}
    app.add_middleware(_LimitsMiddleware, **limits)
    app.set_direct_routes(hot, lambda inner: _LimitsMiddleware(inner, **limits))
    return app


def _metrics(llm, engine, routes: set[str]):
    """The server's Prometheus metrics, or None (and no /metrics) without prometheus_client."""
    try:
        from engine.server.metrics import ServerMetrics
        return ServerMetrics(llm, engine, routes | {"/metrics"})
    except ImportError:
        log.warning("prometheus_client is not installed: no /metrics (pip install prometheus_client)")
        return None
