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

from selfrag.cli.common import CLIError, default_corpus, is_miniature, is_model_name, positive_int, resolve_model
from selfrag.server import make_server, selfrag_routes

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "SELFRAG_API_KEY"


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
                   help="the model id clients send (default: a named model's name, e.g. "
                        "'selfrag-smollm2', or the model directory's name)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request (uvicorn's access log)")
    p.add_argument("--max-tokens-cap", type=positive_int, default=4096, metavar="N",
                   help="largest max_tokens a request may ask for (400 above; default: 4096)")
    p.add_argument("--max-waiting", type=positive_int, default=1024, metavar="N",
                   help="requests waiting for a first token before 429 (default: 1024)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, metavar="N",
                   help="largest request body (413 above; default: 1 MiB)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds running requests get to finish (default: 30)")
    eng = p.add_argument_group("engine", "the LLM(...) arguments of the same names")
    eng.add_argument("--dtype", default="auto", choices=DTYPES,
                     help="weights and activations: auto = fp32 on CPU, the checkpoint's dtype on GPU")
    eng.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="auto: CUDA if present (default: auto)")
    eng.add_argument("--max-num-seqs", type=positive_int, default=256, metavar="N",
                     help="sequences decoded at once (default: 256)")
    eng.add_argument("--max-model-len", type=positive_int, default=None, metavar="N",
                     help="longest prompt + output (default: the config's max_position_embeddings)")
    eng.add_argument("--num-kv-blocks", type=positive_int, default=None, metavar="N",
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


def served_name(model: str | None, path: str) -> str:
    """The model id clients send: a named model's name (``--model selfrag-smollm2``, or the
    Self-RAG SmolLM2 as the default), as vLLM serves ``--model X`` as ``X``; else the
    checkpoint directory's name."""
    from selfrag.smollm2 import MODEL_NAME, is_selfrag_smollm2
    if is_model_name(model):
        return model
    if model is None and is_selfrag_smollm2(path):
        return MODEL_NAME
    return os.path.basename(os.path.normpath(path))


def run_serve(args: argparse.Namespace) -> int:
    msg = _missing_extra()
    if msg:
        raise CLIError(msg)
    sock = _bind(args.host, args.port)          # before anything (torch too) loads
    try:
        import gc

        from engine.llm import LLM
        from engine.server.app import create_app

        path = resolve_model(args.model)
        if is_miniature(path):                 # one torch thread is fastest for the tiny model
            import torch
            torch.set_num_threads(1)
        llm = LLM(path, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                  max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks,
                  gpu_memory_utilization=args.gpu_memory_utilization, kernel_backend=args.kernel_backend,
                  enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
                  quantization=args.quantization, show_progress=sys.stderr.isatty())
        name = args.served_model_name or served_name(args.model, path)
        corpus = default_corpus(path)

        def retriever():
            from selfrag.retrievers import default_retriever
            return default_retriever(corpus=corpus)
        rag = selfrag_routes(retriever_factory=retriever) if llm.get_tokenizer() is not None else None
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
