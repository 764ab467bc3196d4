"""The ``selfrag`` command line.

    selfrag generate [--model DIR] [--max-tokens N] [--temperature T] "prompt"
    selfrag demo [--model DIR] [--max-tokens N]
    selfrag ask [--model DIR] "question" [--passages FILE | --corpus FILE] [--k N]
                [--mode adaptive|always|never] [--long] [--json] [--max-tokens N] [--task T]
    selfrag eval --task popqa|triviaqa|pubhealth|arc_c --input FILE.jsonl [--ndocs N]
                 [--model DIR] [--mode M] [--output PRED.jsonl] [--limit N]
                 [--retriever given|bm25 [--corpus FILE.jsonl]]
    selfrag serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Each subcommand is a ``Command``: a name, a help line, a function adding its
arguments and a function running it (returning an exit status).  New
subcommands register themselves in ``COMMANDS``.

Without ``--model`` the embedded miniature Self-RAG model is used (trained on
generated data; see ``selfrag.default_model``).  ``ask`` without ``--passages``/``--corpus``
retrieves with BM25 over the embedded corpus (``default_retriever()``), with or
without ``--model``.  User errors (a bad model directory, an
invalid option value, ...) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from selfrag.cli import ask, evaluate, generate
from selfrag.cli.common import PROG, CLIError, Command, resolve_model, run_guarded


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from selfrag.cli.demo import add_arguments

    add_arguments(p)


def _run_demo(args: argparse.Namespace) -> int:
    from selfrag.cli.demo import run_demo

    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.model is not None:
        resolve_model(args.model)
    run_demo(args.model, args.max_tokens, args.dtype, device=args.device)
    return 0


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    from selfrag.cli.serve import add_arguments

    add_arguments(p)


def _run_serve(args: argparse.Namespace) -> int:
    from selfrag.cli.serve import run_serve

    return run_serve(args)


# demo and serve load their modules only when chosen (serve's needs FastAPI's extra).
COMMANDS: list[Command] = [
    Command("generate", "generate text for one prompt", generate.add_arguments, generate.run),
    Command("demo", "run the selfrag_llama2_7b model card's three prompts", _demo_arguments, _run_demo),
    Command("ask", "answer one question with Self-RAG (retrieval, critique, candidates)",
            ask.add_arguments, ask.run),
    Command("eval", "short-form evaluation on a released eval file (match, retrieval frequency)",
            evaluate.add_arguments, evaluate.run),
    Command("serve", "serve the model over an OpenAI-compatible HTTP API (+ /v1/selfrag/answer)",
            _serve_arguments, _run_serve),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Self-RAG (Llama-2) inference from the command line.",
        epilog="Without --model, commands use the embedded miniature Self-RAG model (4.7M parameters, "
               "trained on generated data: it answers from passages, knows no facts of its own).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one ``selfrag`` command; returns the exit status."""
    args = build_parser().parse_args(argv)   # usage errors exit 2 here, as argparse does
    return run_guarded(lambda: args._run(args))


def entry() -> None:
    """The console script (and ``python -m selfrag.cli``): ``main()``, then a fast exit.
    Python's own teardown once torch is loaded takes ~0.35 s on the 2-core VM (``python -c
    "import torch"``: 1.41 s to exit normally, 1.00 s with ``os._exit``), a sixth of an
    ``ask``. By then every command has closed what it wrote; the standard streams and
    logging are flushed first."""
    try:
        code = main()
    except SystemExit as e:                  # argparse's usage errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):        # a closed pipe (| head): nothing left to say
            pass
    os._exit(code)
