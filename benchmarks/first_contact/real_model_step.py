"""First-contact step ``real``: a trained model in fp16 and bf16 on the device against the
fp32 CPU reference.

Random weights give flat distributions on which half-precision errors hide; a trained
model's are peaked. The model is the embedded miniature Self-RAG checkpoint
(``selfrag/data/default-v3``: trained, 9 MB, in the repository, so it reaches the GPU
machine, which has no registry and takes at most 64 MiB of extra files; SmolLM2 could
not get there). ``$SELFRAG_REAL_MODEL`` points the step at another checkpoint.

For each Self-RAG prompt (the demo's three, and three questions with a passage from the
embedded corpus) HF transformers on the CPU in fp32 decodes greedily until EOS; the
engine then decodes the same prompts on the device in each half dtype, with the
log-probs of every token. Reported per dtype: top-1 agreement (steps that pick the
reference's token, counted up to each prompt's first divergence, which ends that
prompt's comparison), the steps compared, and the max |log-prob error| of the chosen
tokens over those steps. The dry run does the same on the CPU in fp32 (exact picks).
"""
from __future__ import annotations

import os

# (question, passage title in selfrag/data/corpus.jsonl or None)
QUESTIONS = [("What is the capital of Disir?", "Disir"), ("What language do people speak in Derkur?", "Derkur"),
             ("What was the capital of the Inca Empire?", "The Inca Empire")]


def _model_path() -> str:
    from selfrag.default_model import default_model_dir
    return os.environ.get("SELFRAG_REAL_MODEL") or default_model_dir()


def _prompts(tokenizer) -> list[list[int]]:
    from selfrag.cli.demo import DEMO_PROMPTS, format_prompt
    from selfrag.retrievers import DEFAULT_CORPUS, load_corpus
    passages = {d["title"]: d for d in load_corpus(DEFAULT_CORPUS)}
    texts = [p.prompt for p in DEMO_PROMPTS]
    texts += [format_prompt(q, f"{passages[t]['title']}\n{passages[t]['text']}") for q, t in QUESTIONS]
    return [tokenizer.encode(t) for t in texts]


def _reference(path: str, prompts, new: int, eos: int):
    """Greedy tokens (until EOS or ``new``) and their log-softmax rows from HF in fp32 on CPU."""
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for p in prompts:
            ids, rows = list(p), []
            for _ in range(new):
                logits = model(torch.tensor([ids])).logits[0, -1]
                rows.append(torch.log_softmax(logits.double(), -1))
                ids.append(int(logits.argmax()))
                if ids[-1] == eos:
                    break
            refs.append((ids[len(p):], rows))
    return refs


def real_model(ctx) -> dict:
    from engine import SamplingParams
    from engine.tokenizer.sentencepiece_tokenizer import Tokenizer
    path = _model_path()
    new = 8 if ctx.dry else 48
    tokenizer = Tokenizer.from_pretrained(path)
    prompts = _prompts(tokenizer)
    refs = _reference(path, prompts, new, tokenizer.eos_token_id)
    dtypes = ["float32"] if not ctx.cuda else ["float16", "bfloat16"]
    out = {}
    for dt in dtypes:
        llm = ctx.new_engine(path, device=ctx.device, dtype=dt, show_progress=False, max_num_seqs=len(prompts),
                             **({"num_kv_blocks": 512} if ctx.cuda else {}))
        got = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=new, logprobs=1, skip_special_tokens=False),
                           use_tqdm=False)
        del llm                       # freed before the next dtype's engine (new_engine collects)
        agree = compared = 0
        worst = 0.0
        for (ref, rows), o in zip(refs, got):
            comp = o.outputs[0]
            for step, (a, b) in enumerate(zip(comp.token_ids, ref)):
                compared += 1
                if a != b:
                    break
                agree += 1
                worst = max(worst, abs(comp.logprobs[step][a].logprob - float(rows[step][a])))
        out[dt] = dict(top1_agreement=agree / max(compared, 1), steps_compared=compared,
                       max_chosen_logprob_error=worst)
        ctx.log(f"   {dt}: top-1 agreement {agree}/{compared}, max chosen log-prob error {worst:.4f}")
    ctx.release_engine()
    return dict(model=path, new_tokens=new, prompts=len(prompts),
                reference_tokens=sum(len(r) for r, _ in refs), results=out)
