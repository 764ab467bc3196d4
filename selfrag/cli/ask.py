"""``selfrag ask``: one question through the Self-RAG pipeline (retrieval, critique, candidates)."""

from __future__ import annotations

import argparse
import sys

from selfrag.cli.common import (
    CLIError,
    add_model_arguments,
    default_corpus,
    fmt,
    format_result,
    load_rag,
    model_context,
    positive_int,
    read_passages_file,
    resolve_model,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the question (or instruction)")
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--passages", metavar="FILE",
                     help="use these passages: a JSON array or JSONL of {title, text} objects")
    src.add_argument("--corpus", metavar="FILE",
                     help="retrieve with BM25 over this JSONL corpus of {title, text} "
                          "(default: the embedded corpus)")
    p.add_argument("--k", type=positive_int, default=None, metavar="N",
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
    p.add_argument("--beam-width", type=positive_int, default=2, metavar="N", help="--long (default: 2)")
    p.add_argument("--max-depth", type=positive_int, default=7, metavar="N",
                   help="--long: segments at most (default: 7)")
    p.add_argument("--max-tokens", type=positive_int, default=100, metavar="N",
                   help="tokens per answer (per segment with --long; default: 100)")
    p.add_argument("--top", type=positive_int, default=5, metavar="N",
                   help="candidates to print (default: 5)")
    p.add_argument("--json", action="store_true", help="print Result.to_dict() as JSON only")


def run(args: argparse.Namespace) -> int:
    import json

    from selfrag.prompts import canonical_task

    if not args.question.strip():
        raise CLIError("the question is empty")
    if args.long and args.mode is not None:
        raise CLIError("--mode applies to the short form; --long always retrieves")
    canonical_task(args.task)                           # unknown task: fail before loading
    passages = read_passages_file(args.passages) if args.passages else None
    path = resolve_model(args.model)
    if passages is not None:
        retriever = None
    else:
        from selfrag.retrievers import BM25Retriever, default_retriever

        try:
            retriever = BM25Retriever(args.corpus) if args.corpus else default_retriever(
                corpus=default_corpus(path))
        except ImportError as e:
            raise CLIError(f"BM25 retrieval needs the bm25s package ({e}); install it or pass "
                           "--passages FILE") from None
    with model_context(path):
        rag = load_rag(args, path, retriever)
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
              f"{args.passages} (retrieval probability {fmt(result.retrieval_prob)} <= threshold "
              f"{args.threshold}); pass --mode always to use them", file=sys.stderr)
    return 0
