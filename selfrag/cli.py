"""The ``selfrag`` command line.

    selfrag generate [--model DIR] [--max-tokens N] [--temperature T] "prompt"
    selfrag demo [--model DIR] [--max-tokens N]

Each subcommand is a ``Command``: a name, a help line, a function adding its
arguments and a function running it (returning an exit status).  New
subcommands register themselves in ``COMMANDS``.

Without ``--model`` the embedded default model is used; it has RANDOM weights
(see ``selfrag.default_model``).  User errors (a bad model directory, an
invalid option value, ...) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

PROG = "selfrag"
EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def run_guarded(fn: Callable[[], object], prog: str = PROG) -> int:
    """Runs ``fn``; user errors become one stderr line and status 2, Ctrl-C status 130."""
    try:
        result = fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError) as e:  # engine errors are ValueErrors
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    return result if isinstance(result, int) else 0


def _resolve_model(model: str | None, note_stream=None) -> str:
    """The checkpoint to load: ``--model`` (checked early, for a clear message) or the default."""
    import os

    if model is None:
        from selfrag.default_model import default_model_dir

        path = default_model_dir()
        print(f"{PROG}: no --model given: using the embedded default model at {path}; it has RANDOM "
              "weights, so its text is gibberish (pass --model DIR for a real checkpoint)",
              file=note_stream or sys.stderr)
        return path
    if not os.path.exists(model):
        raise CLIError(f"--model {model}: no such directory")
    if not os.path.isdir(model):
        raise CLIError(f"--model {model}: not a directory (expected a checkpoint directory)")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise CLIError(f"--model {model}: no config.json in that directory (not a checkpoint)")
    return model


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (HF layout, safetensors); default: the embedded "
                        "random-weight model")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "half"],
                   help="weights/compute dtype (auto: fp32 on CPU, the checkpoint's dtype on GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")


# ---------------------------------------------------------------- generate
def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text (used as is: no template is applied)")
    _add_model_arguments(p)
    p.add_argument("--max-tokens", type=_positive_int, default=64, metavar="N",
                   help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    p.add_argument("--show-special-tokens", action="store_true",
                   help="keep reflection tokens such as [Retrieval] in the printed text")


def _run_generate(args: argparse.Namespace) -> int:
    import contextlib

    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed, skip_special_tokens=not args.show_special_tokens)
    path = _resolve_model(args.model)
    if args.model is None:
        from selfrag.default_model import few_threads

        threads = few_threads(1)          # the tiny default model runs fastest on one thread
    else:
        threads = contextlib.nullcontext()
    with threads:
        return _generate(args, path, params)


def _generate(args: argparse.Namespace, path: str, params) -> int:
    from engine.llm import LLM
    from selfrag.demo import printable

    llm = LLM(path, dtype=args.dtype, device=args.device, max_num_seqs=1,
              show_progress=args.model is not None and sys.stderr.isatty())
    if llm.tokenizer is None:
        raise CLIError(f"--model {path}: no tokenizer.model in that directory, cannot encode a text prompt")

    # Our own step loop (rather than llm.stream) so the token count is at hand too.
    rid = llm.add_request(args.prompt, params)
    sent, final = 0, None
    t0 = time.perf_counter()
    try:
        while final is None:
            for out in llm.step():
                if out.request_id != rid:
                    continue
                text = out.outputs[0].text
                if len(text) > sent:
                    sys.stdout.write(printable(text[sent:]))
                    sys.stdout.flush()
                    sent = len(text)
                if out.finished:
                    final = out
    finally:
        if final is None:
            llm.abort(rid)
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    sys.stdout.flush()
    completion = final.outputs[0]
    n = len(completion.token_ids)
    rate = n / dt if dt > 0 else float("inf")
    print(f"[{n} tokens in {dt:.2f}s, {rate:.1f} tokens/s, prompt {len(final.prompt_token_ids)} tokens, "
          f"finish_reason={completion.finish_reason}]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- demo
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from selfrag.demo import add_arguments

    add_arguments(p)


def _run_demo(args: argparse.Namespace) -> int:
    from selfrag.demo import run_demo

    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.model is not None:
        _resolve_model(args.model)
    run_demo(args.model, args.max_tokens, args.dtype)
    return 0


COMMANDS: list[Command] = [
    Command("generate", "generate text for one prompt", _generate_arguments, _run_generate),
    Command("demo", "run the selfrag_llama2_7b model card's three prompts", _demo_arguments, _run_demo),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Self-RAG (Llama-2) inference from the command line.",
        epilog="Without --model, commands use the embedded default model, which has RANDOM weights.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``selfrag`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)   # usage errors exit 2 here, as argparse does
    return run_guarded(lambda: args._run(args))


if __name__ == "__main__":
    sys.exit(main())
