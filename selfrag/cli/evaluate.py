"""``selfrag eval``: short-form evaluation on a released eval file (match, retrieval frequency)."""

from __future__ import annotations

import argparse
import sys

from selfrag.cli.common import add_model_arguments, default_corpus, load_rag, model_context, positive_int, resolve_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    from selfrag.evaluate import TASKS

    p.add_argument("--task", required=True, choices=list(TASKS), help="the eval file's task")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="eval file (released eval_data JSONL layout)")
    add_model_arguments(p)
    p.add_argument("--ndocs", type=positive_int, default=None, metavar="N",
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
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help="default: 100 open, 50 closed tasks")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="questions per engine batch (default: 8)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="only the first N records")
    p.add_argument("--output", metavar="PRED.jsonl", default=None, help="write predictions here")


def run(args: argparse.Namespace) -> int:
    from selfrag.evaluate import evaluate, load_eval_file, write_predictions

    bm25 = args.retriever == "bm25"
    if args.corpus is not None and not bm25:
        raise ValueError("--corpus needs --retriever bm25")
    # Bad input fails before loading the model.
    records = load_eval_file(args.input, args.task, need_passages=not bm25)
    if args.limit is not None:
        records = records[:args.limit]
    path = resolve_model(args.model)
    retriever = None
    if bm25:
        from selfrag.retrievers import BM25Retriever, default_retriever

        retriever = BM25Retriever(args.corpus) if args.corpus else default_retriever(
            corpus=default_corpus(path))
    with model_context(path):
        rag = load_rag(args, path, retriever)
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
