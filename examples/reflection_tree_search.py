"""A tree search over Self-RAG's reflection tokens on shared KV (public API only).

The question is prefilled once and held, forked per passage, each copy extended with
its passage. The search forks at each reflection point and tries every choice: the
relevance tokens, then, where the evidence text reaches a support token, the three
support tokens. A branch scores the probabilities the model gave its choices within
their group (Self-RAG's critique, from ``logprob_token_ids``) plus exp(mean log-prob) of
its text; after each level the ``keep`` best survive, the rest are released. A forced
choice replaces the token sampled there, which had no KV yet (``replace_last=True``).

    python examples/reflection_tree_search.py [--model DIR] "question" "passage" ...
"""
import argparse
import math

from engine import LLM, SamplingParams
from selfrag.prompts import format_passage, format_prompt
from selfrag.scoring import group_probs
from selfrag.types import Passage
from selfrag.vocab import ReflectionVocab


def tree_search(llm, question, passages, keep=2, max_tokens=40):
    tok = llm.get_tokenizer()
    v = ReflectionVocab.from_tokenizer(tok)

    def turn(stop=None, hold=True, n=max_tokens):
        return SamplingParams(temperature=0, max_tokens=n, hold=hold, stop_token_ids=stop,
                              skip_special_tokens=False, logprob_token_ids=list(v.scored_ids))

    root = llm.add_request(format_prompt(question), SamplingParams(max_tokens=0, hold=True))
    llm.wait([root])
    rids = [root] + llm.fork(root, n=len(passages) - 1)
    for rid, p in zip(rids, passages):     # one token: what the model would write first
        llm.extend(rid, tok.encode(format_passage(p), add_special_tokens=False), turn(n=1))
    outs = llm.wait(rids)
    # level 1: every relevance token, then evidence text up to the model's support token
    branches = []
    for rid, p in zip(rids, passages):
        probs = group_probs(outs[rid].outputs[0].logprobs[-1], v.relevance_group)
        for kid, rel, pr in zip([rid] + llm.fork(rid, n=1), v.relevance_group, probs):
            llm.extend(kid, [rel], turn(stop=v.support_group), replace_last=True)
            branches.append(dict(rid=kid, passage=p.title, score=pr, text=[rel]))
    branches = prune(llm, branches, keep)
    # level 2: where a branch stopped at a support token, every support token, then the rest
    final = []
    for b in branches:
        out = b["out"]
        if not out.token_ids or out.token_ids[-1] not in v.support_group:
            final.append(b)                # it ended (</s>, length) without a support token
            continue
        probs = group_probs(out.logprobs[-1], v.support_group)
        for kid, sup, pr in zip([b["rid"]] + llm.fork(b["rid"], n=2), v.support_group, probs):
            llm.extend(kid, [sup], turn(hold=False), replace_last=True)
            final.append(dict(b, rid=kid, score=b["score"] + pr, text=b["text"][:-1] + [sup], out=None))
    best = sorted(prune(llm, final, keep), key=lambda b: -b["score"])
    for b in best:                         # a survivor that ended at level 1 is still held
        llm.release(b["rid"])
    return best


def prune(llm, branches, keep):
    """Runs the branches not yet run, adds exp(mean log-prob) of what each wrote to its
    score, keeps the ``keep`` best and releases the others."""
    outs = llm.wait([b["rid"] for b in branches if b.get("out") is None])
    for b in branches:
        if b.get("out") is None:
            out = b["out"] = outs[b["rid"]].outputs[0]
            b["score"] += math.exp(out.cumulative_logprob / max(len(out.token_ids), 1))
            b["text"] = b["text"] + list(out.token_ids)
    branches.sort(key=lambda b: -b["score"])
    for b in branches[keep:]:
        llm.release(b["rid"])
    return branches[:keep]



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question", nargs="?", default="What were alpacas bred for?")
    ap.add_argument("passages", nargs="*", default=["Alpacas were bred for their fiber.",
                                                    "Llamas are used as pack animals."])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded model)")
    args = ap.parse_args()
    if args.model is None:
        from selfrag.default_model import default_model_dir
        args.model = default_model_dir()
    llm = LLM(args.model, show_progress=False)
    tok = llm.get_tokenizer()
    for b in tree_search(llm, args.question, [Passage(f"P{i}", t) for i, t in enumerate(args.passages)]):
        print(f"{b['score']:6.3f}  {b['passage']}: {tok.decode(b['text'], skip_special_tokens=False)!r}")


if __name__ == "__main__":
    main()
