"""Beam search with a scorer of your own, on shared KV, on the engine's public API only.

Each beam is a held request that has just computed its next-token distribution (a
one-token turn with ``logprobs=2w``). A step scores every beam's top-2w continuations
with ``scorer(tokens, cum_logprob)``, keeps the best w, and continues each by
``fork`` (one copy per extra child: KV shared) and ``extend(..., replace_last=True)``
(the chosen token replaces the one the turn sampled, which had no KV yet). Nothing is
prefilled twice. With the default scorer (cumulative log-prob) it is HF's beam search
with ``length_penalty=0`` and no EOS, i.e. ``LLM.beam_search(..., length_penalty=0)``.

    python examples/beam_search_custom_scorer.py [--model DIR] [--width 3] "prompt"
"""
import argparse

from engine import LLM, SamplingParams


def log_prob(tokens, cum_logprob):
    return cum_logprob


def no_repeats(tokens, cum_logprob):
    """Log-prob, minus 2 per token that repeats one of the last four."""
    return cum_logprob - 2.0 * sum(t in tokens[max(0, i - 4):i] for i, t in enumerate(tokens))


def beam_search(llm, prompt, width=3, max_tokens=16, scorer=log_prob):
    turn = SamplingParams(max_tokens=1, temperature=0, logprobs=2 * width, hold=True, ignore_eos=True)
    beams = [dict(rid=llm.add_request(prompt, turn), tokens=[], lp=0.0)]
    try:
        for step in range(max_tokens):
            outs = llm.wait([b["rid"] for b in beams])
            cands = [(scorer(b["tokens"] + [t], b["lp"] + e.logprob), b, t, b["lp"] + e.logprob)
                     for b in beams for t, e in outs[b["rid"]].outputs[0].logprobs[0].items()]
            cands.sort(key=lambda c: -c[0])
            chosen = cands[:width]
            children = {}
            for _, parent, t, lp in chosen:
                children.setdefault(parent["rid"], []).append(dict(tokens=parent["tokens"] + [t], lp=lp))
            for b in beams:                                  # beams nobody continues
                if b["rid"] not in children:
                    llm.release(b["rid"])
            beams = []
            for rid, kids in children.items():
                for r, kid in zip([rid] + (llm.fork(rid, n=len(kids) - 1) if len(kids) > 1 else []), kids):
                    kid["rid"] = r
                    beams.append(kid)
            if step + 1 < max_tokens:
                for b in beams:
                    llm.extend(b["rid"], [b["tokens"][-1]], turn, replace_last=True)
    finally:
        for b in beams:
            llm.release(b["rid"])
    return sorted(((scorer(b["tokens"], b["lp"]), b["tokens"]) for b in beams), key=lambda x: -x[0])



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="The llama is")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    ap.add_argument("--width", type=int, default=3)
    args = ap.parse_args()
    if args.model is None:
        from selfrag.default_model import default_model_dir
        args.model = default_model_dir()
    llm = LLM(args.model, show_progress=False)
    for score, tokens in beam_search(llm, args.prompt, args.width, scorer=no_repeats):
        print(f"{score:8.3f}  {llm.get_tokenizer().decode(tokens)!r}")


if __name__ == "__main__":
    main()
