"""Best-of-n with Self-RAG's critique scores, on the engine's public API only.

Samples n answers for one question and one passage with ``SamplingParams(n=...)`` (one
prefill; the samples share its KV; sample i is seeded seed + i, so reproducible),
reads the reflection-token log-probs the engine gathers at every step
(``logprob_token_ids``), scores each answer like Self-RAG's short form and prints them
best first.

    python examples/best_of_n.py [--model DIR] [--n 8] "question" "passage text"
"""
import argparse

from engine import LLM, SamplingParams
from selfrag.prompts import format_passage, format_prompt
from selfrag.scoring import score_candidate
from selfrag.types import Passage
from selfrag.vocab import ReflectionVocab


def best_of_n(llm, question, passage, n=8, temperature=0.8, max_tokens=100, seed=0):
    tok = llm.get_tokenizer()
    vocab = ReflectionVocab.from_tokenizer(tok)
    prompt = format_prompt(question) + format_passage(passage)
    params = SamplingParams(n=n, seed=seed, temperature=temperature, top_p=0.95, max_tokens=max_tokens,
                            skip_special_tokens=False, logprob_token_ids=list(vocab.scored_ids))
    scored = []
    for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs:
        s = score_candidate(c.token_ids, c.logprobs, c.cumulative_logprob, vocab)
        scored.append((s.final, s, c.text))
    return sorted(scored, key=lambda x: x[0], reverse=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question", nargs="?", default="Can you tell me the difference between llamas and alpacas?")
    ap.add_argument("passage", nargs="?", default="Alpacas are considerably smaller than llamas and "
                    "were bred for their fiber, not as working animals.")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    ap.add_argument("--n", type=int, default=8)
    args = ap.parse_args()
    if args.model is None:
        from selfrag.default_model import default_model_dir
        args.model = default_model_dir()
    llm = LLM(args.model, show_progress=False)
    for final, s, text in best_of_n(llm, args.question, Passage("", args.passage), n=args.n):
        print(f"{final:6.3f}  rel {s.rel:.2f} sup {s.sup:.2f} use {s.use:+.2f} seq {s.seq:.2f}  {text[:80]!r}")


if __name__ == "__main__":
    main()
