"""``POST /v1/completions``: OpenAI's legacy completions (prompt strings or token ids, ``n``,
``echo``, legacy log-probs), whole or streamed as SSE."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.server.asgi import APIError
from engine.server.logprobs_format import echo_part, joined, legacy_logprobs
from engine.server.protocol import CompletionRequest, new_id, now_s, usage
from engine.server.serving import SSE_HEADERS, OpenAIServing
from engine.server.streaming import ClientGone, EventStream, compact_json, sse, sse_prefix, watch_disconnect


def _prompts(p) -> list:
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [{"prompt_token_ids": list(p)}]
    if p and all(isinstance(x, list) for x in p):
        return [{"prompt_token_ids": list(x)} for x in p]
    if p and all(isinstance(x, str) for x in p):
        return list(p)
    raise APIError(400, "prompt must be a non-empty string, list of strings, token-id list "
                        "or list of token-id lists", param="prompt")


async def create_completion(s: OpenAIServing, request: Request):
    req = await s.parse_body(request, CompletionRequest)
    s.check_model(req.model)
    prompts = _prompts(req.prompt)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens must be >= 1 (0 only with echo: the prompt's log-probs)",
                       param="max_tokens")
    prompt_lps = (req.logprobs or 0) if req.echo and (req.logprobs is not None or max_tokens == 0) else None
    params = s.sampling(req, max_tokens, req.logprobs, prompt_lps)
    n = req.n
    cid = new_id("cmpl")
    sub = s.prepare(prompts, params, cid)
    s.check_fits(sub, params.max_tokens)
    rids = sub.rids
    watcher = watch_disconnect(request.receive, sub.queue)
    created, model, tokenizer = now_s(), s.served_model_name, s.tokenizer

    if not req.stream:
        finals = {}
        try:
            async for i, out in s.outputs(sub):
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
        async for i, out in s.outputs(sub):
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

    return EventStream(stream(), watcher, on_close=lambda: s.engine.discard(sub), headers=SSE_HEADERS)
