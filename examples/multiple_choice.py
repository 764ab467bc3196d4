"""Multiple-choice answering with ``LLM.score``, on the engine's public API only.

The question is prefilled once and shared (``LLM.score`` holds it, forks it per choice
and extends each copy with its choice); each choice's log-probability, divided by its
token count (so long choices are not penalised for their length), ranks it.

    python examples/multiple_choice.py [--model DIR] "question" "choice A" "choice B" ...
"""
import argparse

from engine import LLM
from selfrag.prompts import format_prompt


def rank_choices(llm, question, choices, normalize=True):
    tok = llm.get_tokenizer()
    prompt = format_prompt(question) + "[No Retrieval]"
    ids = [tok.encode(" " + c, add_special_tokens=False) for c in choices]
    per_token = llm.score(prompt, ids, per_token=True)
    scores = [sum(v) / (len(v) if normalize else 1) for v in per_token]
    return sorted(zip(scores, choices), key=lambda x: -x[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question", nargs="?", default="Which animal was bred for its fiber?")
    ap.add_argument("choices", nargs="*", default=["The alpaca.", "The llama.", "The camel."])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    args = ap.parse_args()
    if args.model is None:
        from selfrag.default_model import default_model_dir
        args.model = default_model_dir()
    llm = LLM(args.model, show_progress=False)
    for score, choice in rank_choices(llm, args.question, args.choices):
        print(f"{score:8.3f}  {choice}")


if __name__ == "__main__":
    main()
