"""Self-RAG over HTTP: ``selfrag_routes`` adds ``POST /v1/selfrag/answer`` to the engine's
OpenAI-compatible app (``create_app(rag=...)``), and ``make_server`` is the uvicorn server that
``selfrag serve`` runs, draining on SIGTERM."""

def selfrag_routes(retriever=None, retriever_factory=None):
    """An ``install(app, engine)`` hook for ``create_app(rag=...)`` adding
    ``POST /v1/selfrag/answer``. ``retriever`` (or, lazily, ``retriever_factory()``;
    default ``default_retriever``) serves requests without ``passages``."""
    import asyncio

    from starlette.requests import Request
    from starlette.responses import Response

    from engine.server.protocol import SelfRAGRequest
    from engine.server.streaming import ClientGone, until_disconnect
    from selfrag.pipeline import SelfRAG
    from selfrag.types import Passage

    state = {"retriever": retriever}

    def get_retriever():
        if state["retriever"] is None:
            if retriever_factory is not None:
                state["retriever"] = retriever_factory()
            else:
                from selfrag.retrievers import default_retriever
                state["retriever"] = default_retriever()
        return state["retriever"]

    def install(app, engine):
        APIError = app.state.api_error
        cap = app.state.max_tokens_cap

        def run(req: SelfRAGRequest, llm) -> dict:
            passages = (None if req.passages is None
                        else [Passage(title=p.title, text=p.text) for p in req.passages])
            retr = None
            if passages is None and (req.long or req.mode != "never"):
                try:
                    retr = get_retriever()
                except ImportError as e:
                    raise APIError(400, f"no passages given and no retriever available ({e}); "
                                        "pass 'passages'", param="passages") from None
            rag = SelfRAG(llm, retr)
            common = dict(task=req.task, w_rel=req.w_rel, w_sup=req.w_sup, w_use=req.w_use,
                          use_seqscore=req.use_seqscore, constrained=req.constrained)
            if req.long:
                result = rag.generate_long(req.question, passages=passages, k=req.k,
                                           beam_width=req.beam_width, max_depth=req.max_depth,
                                           segment_tokens=req.max_tokens, **common)
            else:
                result = rag.answer(req.question, passages=passages, k=req.k, mode=req.mode,
                                    threshold=req.threshold, rule=req.rule,
                                    max_tokens=req.max_tokens, **common)
            if result.error is not None:
                raise APIError(500, result.error, "server_error", code="request_failed")
            return result.to_dict()

        @app.post("/v1/selfrag/answer")
        async def selfrag_answer(req: SelfRAGRequest, request: Request):
            served = app.state.served_model_name
            if req.model is not None and req.model != served:
                raise APIError(404, f"the model {req.model!r} does not exist (served: {served!r})",
                               "not_found_error", "model", "model_not_found")
            if req.stream:
                raise APIError(400, "streaming is not supported on /v1/selfrag/answer: the answer "
                                    "comes after every branch is scored", param="stream")
            if req.max_tokens > cap:
                raise APIError(400, f"max_tokens={req.max_tokens} is over this server's cap of {cap}",
                               param="max_tokens")
            if engine.draining:
                raise APIError(503, "the server is shutting down", "service_unavailable", code="draining")
            # The pipeline blocks, so it runs in a worker thread; a client that hangs up
            # cancels its proxy, which aborts its branches within one engine step.
            llm = engine.sync_llm()
            work = asyncio.ensure_future(asyncio.to_thread(run, req, llm))
            gone = asyncio.ensure_future(until_disconnect(request.receive))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not work.done():          # the client left (or the server is stopping)
                    llm.cancel(ClientGone())
                    await asyncio.wait({work})   # the thread unwinds at its next engine call
            if isinstance(work.exception(), ClientGone):
                return Response(status_code=499)    # nginx's 'client closed'; uvicorn drops it
            try:
                return work.result()
            except APIError:
                raise
            except ValueError as e:
                raise APIError(400, str(e)) from None

    return install


# ---------------------------------------------------------------- the CLI subcommand


def make_server(app, host: str, port: int, graceful_timeout: float = 30.0, log_level: str = "info",
                access_log: bool = False):
    """A ``uvicorn.Server`` whose SIGTERM/SIGINT first makes the engine refuse new
    requests, then lets running ones finish within ``graceful_timeout``: uvicorn stops
    listening at once (new connections are refused), a request arriving on an open
    keep-alive connection gets a 503, and requests in flight run to the end."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.engine.begin_drain()
            super().handle_exit(sig, frame)

    # proxy_headers=False: nothing here reads the client address, and uvicorn's
    # X-Forwarded-For middleware is one more layer on every request's path.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, proxy_headers=False,
                            timeout_graceful_shutdown=graceful_timeout, access_log=access_log)
    return DrainingServer(config)
