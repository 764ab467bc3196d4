"""``POST /v1/chat/completions``: a conversation rendered by the checkpoint's chat template (or
the server's ``chat_prompt``), ``n`` choices, log-probs, whole or streamed as SSE."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.server.asgi import APIError
from engine.server.chat import ChatError, normalize_messages
from engine.server.logprobs_format import chat_logprobs
from engine.server.protocol import ChatCompletionRequest, new_id, now_s, usage
from engine.server.serving import SSE_HEADERS, OpenAIServing
from engine.server.streaming import ClientGone, EventStream, compact_json, sse, sse_prefix, watch_disconnect


async def create_chat_completion(s: OpenAIServing, request: Request):
    req = await s.parse_body(request, ChatCompletionRequest)
    s.check_model(req.model)
    try:
        prompt = s.render_chat(normalize_messages(req.messages))
    except ChatError as e:
        raise APIError(400, str(e), param=e.param) from None
    n_prompt = len(prompt["prompt_token_ids"])
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:               # as much as fits, up to the server's cap
        max_tokens = max(1, min(s.max_tokens_cap, s.llm.max_model_len - n_prompt))
    top = req.top_logprobs or 0
    params = s.sampling(req, max_tokens, top if req.logprobs else None)
    cid = new_id("chatcmpl")
    sub = s.prepare([prompt], params, cid)
    s.check_fits(sub, max_tokens)
    watcher = watch_disconnect(request.receive, sub.queue)
    created, model = now_s(), s.served_model_name

    if not req.stream:
        final = None
        try:
            async for _, out in s.outputs(sub):
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
                             "usage": usage(len(final.prompt_token_ids),
                                            sum(len(c.token_ids) for c in final.outputs))})

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def stream():
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        prefix = sse_prefix(head)
        yield sse({**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None} for j in range(req.n)]})
        sent_text, sent_tok, done = [0] * req.n, [0] * req.n, set()
        final = None
        async for _, out in s.outputs(sub):
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

    return EventStream(stream(), watcher, on_close=lambda: s.engine.discard(sub), headers=SSE_HEADERS)
