"""``selfrag serve``: the OpenAI-compatible server plus ``POST /v1/selfrag/answer``.

    selfrag serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

``/v1/selfrag/answer`` takes ``{question, passages?: [{title, text}], k, task,
mode, threshold, rule, w_rel, w_sup, w_use, use_seqscore, constrained,
max_tokens, long, beam_width, max_depth}`` and returns ``Result.to_dict()``.
The pipeline runs in a worker thread over an LLM-shaped proxy of the shared
engine (``AsyncEngine.sync_llm()``): every engine call goes through the
engine's lock and stepping thread, so Self-RAG branches batch with the HTTP
completions and never race with ``step()``. A client that hangs up cancels the
proxy (``SyncLLMProxy.cancel``): the worker's branches are aborted at its next
engine step and the thread unwinds.
"""

import argparse
import asyncio
import sys

from selfrag.cli import CLIError, _resolve_model

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def selfrag_routes(retriever=None, retriever_factory=None):
    """An ``install(app, engine)`` hook for ``create_app(rag=...)`` adding
    ``POST /v1/selfrag/answer``. ``retriever`` (or, lazily, ``retriever_factory()``;
    default ``default_retriever``) serves requests without ``passages``."""
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
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (default: the embedded random-weight model)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default: {DEFAULT_HOST}, loopback)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every request (401 otherwise)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the model directory's name)")
    p.add_argument("--max-tokens-cap", type=int, default=4096, metavar="N")
    p.add_argument("--max-waiting", type=int, default=1024, metavar="N",
                   help="requests waiting for a first token before 429 (default: 1024)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N")
    p.add_argument("--graceful-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish (default: 30)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")


def _missing_extra() -> str | None:
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"serve needs {' and '.join(missing)}: pip install 'selfrag-engine[serve]' "
                "(or pip install fastapi uvicorn)")
    return None


def make_server(app, host: str, port: int, graceful_timeout: float = 30.0, log_level: str = "info"):
    """A ``uvicorn.Server`` whose SIGTERM/SIGINT first makes the engine refuse new
    requests (503), then lets running ones finish within ``graceful_timeout``."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.engine.begin_drain()
            super().handle_exit(sig, frame)

    # proxy_headers=False: nothing here reads the client address, and uvicorn's
    # X-Forwarded-For middleware is one more layer on every request's path.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, proxy_headers=False,
                            timeout_graceful_shutdown=graceful_timeout, access_log=False)
    return DrainingServer(config)


def run_serve(args: argparse.Namespace) -> int:
    msg = _missing_extra()
    if msg:
        raise CLIError(msg)
    import gc
    import os

    from engine.llm import LLM
    from engine.server.app import create_app

    for name in ("port", "max_tokens_cap", "max_waiting", "max_body_bytes"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be positive")
    path = _resolve_model(args.model)
    if args.model is None:                     # one torch thread is fastest for the tiny model
        import torch
        torch.set_num_threads(1)
    llm = LLM(path, dtype=args.dtype, device=args.device, show_progress=sys.stderr.isatty())
    name = args.served_model_name or os.path.basename(os.path.normpath(path))
    rag = selfrag_routes() if llm.get_tokenizer() is not None else None
    from selfrag.prompts import format_prompt
    app = create_app(llm, served_model_name=name, api_key=args.api_key, rag=rag,
                     max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
                     max_waiting=args.max_waiting, chat_prompt=format_prompt)
    # Everything alive now (weights' wrappers, tokenizer, FastAPI/pydantic schemas:
    # ~230k objects) goes to the permanent generation, so the cyclic GC never scans it
    # again. Unfrozen, a full collection every few dozen requests paused the event loop
    # for ~100 ms on the CPU VM (the p99 TTFT at 8 clients); vLLM's server does the same.
    gc.collect()
    gc.freeze()
    print(f"selfrag serve: model {name!r} on http://{args.host}:{args.port}/v1 "
          f"(auth: {'Bearer key' if args.api_key else 'none'})", file=sys.stderr, flush=True)
    make_server(app, args.host, args.port, args.graceful_timeout).run()
    return 0
