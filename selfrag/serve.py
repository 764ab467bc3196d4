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
import os
import sys

from selfrag.cli import CLIError, _positive_int, _resolve_model

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "SELFRAG_API_KEY"


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
DTYPES = ["auto", "half", "float16", "bfloat16", "float32"]


def _port(text: str) -> int:
    """--port: 1-65535, or 0 for any free port (the printed URL shows which)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 1-65535 (0: any free port)")
    return port


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{v} must be in (0, 1]")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (default: the embedded random-weight model)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default: {DEFAULT_HOST}, loopback)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"port, 1-65535, or 0 for any free one (default: {DEFAULT_PORT})")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every API request (401 otherwise); "
                        f"default: ${API_KEY_ENV}, which keeps the key out of ps")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the model directory's name)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request (uvicorn's access log)")
    p.add_argument("--max-tokens-cap", type=_positive_int, default=4096, metavar="N",
                   help="largest max_tokens a request may ask for (400 above; default: 4096)")
    p.add_argument("--max-waiting", type=_positive_int, default=1024, metavar="N",
                   help="requests waiting for a first token before 429 (default: 1024)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20, metavar="N",
                   help="largest request body (413 above; default: 1 MiB)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish (default: 30)")
    eng = p.add_argument_group("engine", "the LLM(...) arguments of the same names")
    eng.add_argument("--dtype", default="auto", choices=DTYPES,
                     help="weights and activations: auto = fp32 on CPU, the checkpoint's dtype on GPU")
    eng.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="auto: CUDA if present (default: auto)")
    eng.add_argument("--max-num-seqs", type=_positive_int, default=256, metavar="N",
                     help="sequences decoded at once (default: 256)")
    eng.add_argument("--max-model-len", type=_positive_int, default=None, metavar="N",
                     help="longest prompt + output (default: the config's max_position_embeddings)")
    eng.add_argument("--num-kv-blocks", type=_positive_int, default=None, metavar="N",
                     help="KV pool size in blocks of 16 tokens (default: sized from memory)")
    eng.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9, metavar="F",
                     help="fraction of GPU memory the engine may use (default: 0.9)")
    eng.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"],
                     help="auto: the Triton kernels on CUDA, the PyTorch reference on CPU")
    eng.add_argument("--no-prefix-caching", action="store_true",
                     help="do not share KV blocks of identical prompt prefixes")
    eng.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")
    eng.add_argument("--quantization", default=None, choices=["int8", "fp8"],
                     help="weight-only 8-bit weights, quantized as the checkpoint loads (fp8: sm_89+ "
                          "GPUs or CPU; default: none)")


def _bind(host: str, port: int):
    """The listening socket, bound before the model loads: a busy port or a bad host
    is reported at once, and --port 0 learns its real port."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise CLIError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e} (is another server "
                       "running there? pick another --port, or 0 for any free one)") from None
    sock.listen(2048)
    return sock


def _missing_extra() -> str | None:
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"serve needs {' and '.join(missing)}: pip install 'selfrag-engine[serve]' "
                "(or pip install fastapi uvicorn)")
    return None


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


def run_serve(args: argparse.Namespace) -> int:
    msg = _missing_extra()
    if msg:
        raise CLIError(msg)
    sock = _bind(args.host, args.port)          # before anything (torch too) loads
    try:
        import gc

        from engine.llm import LLM
        from engine.server.app import create_app

        path = _resolve_model(args.model)
        if args.model is None:                 # one torch thread is fastest for the tiny model
            import torch
            torch.set_num_threads(1)
        llm = LLM(path, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                  max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks,
                  gpu_memory_utilization=args.gpu_memory_utilization, kernel_backend=args.kernel_backend,
                  enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
                  quantization=args.quantization, show_progress=sys.stderr.isatty())
        name = args.served_model_name or os.path.basename(os.path.normpath(path))
        rag = selfrag_routes() if llm.get_tokenizer() is not None else None
        from selfrag.prompts import render_chat
        app = create_app(llm, served_model_name=name, api_key=args.api_key, rag=rag,
                         max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
                         max_waiting=args.max_waiting, chat_prompt=render_chat)
        # Everything alive now (weights' wrappers, tokenizer, FastAPI/pydantic schemas:
        # ~230k objects) goes to the permanent generation, so the cyclic GC never scans it
        # again. Unfrozen, a full collection every few dozen requests paused the event loop
        # for ~100 ms on the CPU VM (the p99 TTFT at 8 clients); vLLM's server does the same.
        gc.collect()
        gc.freeze()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        weights = str(llm.model.dtype).replace("torch.", "") + (f", {args.quantization} weights"
                                                                 if args.quantization else "")
        print(f"selfrag serve: model {name!r} ({weights}) on http://{shown}:{port}/v1 "
              f"(auth: {'Bearer key' if args.api_key else 'none'})", file=sys.stderr, flush=True)
        make_server(app, host, port, args.graceful_timeout, access_log=args.access_log).run(sockets=[sock])
    finally:
        sock.close()
    return 0
