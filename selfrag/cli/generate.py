"""``selfrag generate``: one prompt, streamed to stdout."""

from __future__ import annotations

import argparse
import sys
import time

from selfrag.cli.common import CLIError, add_model_arguments, positive_int, printable, resolve_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the instruction; sent in Self-RAG's prompt format "
                                  "('### Instruction:\\n...\\n\\n### Response:\\n'), or through the "
                                  "model's chat template if it has one, unless --raw")
    p.add_argument("--raw", action="store_true", help="send the prompt text as is (no template)")
    add_model_arguments(p)
    p.add_argument("--max-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    p.add_argument("--show-special-tokens", action="store_true",
                   help="keep reflection tokens such as [Retrieval] in the printed text")


def run(args: argparse.Namespace) -> int:
    import contextlib

    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed, skip_special_tokens=not args.show_special_tokens)
    path = resolve_model(args.model)
    if args.model is None:
        from selfrag.default_model import few_threads

        threads = few_threads(1)          # the tiny default model runs fastest on one thread
    else:
        threads = contextlib.nullcontext()
    with threads:
        return _generate(args, path, params)


def _generate(args: argparse.Namespace, path: str, params) -> int:
    from engine.llm import LLM

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
