"""A real model on the CPU: SmolLM2-135M-Instruct (engine.model.pypi_models), engine vs HF generate.

    python benchmarks/bench_real_model.py [--new-tokens 128]

Batch 1 and batch 16 chat prompts, greedy, a fixed number of new tokens (EOS ignored),
each side warmed up at the timed shapes first. Reports tok/s, the engine/HF ratio, and
the fraction of this machine's memory bandwidth (measured in the same run: a 1 GiB
tensor copy, bytes read + written) that the decode reaches: every decode step streams
all fp32 weights once (the tied embedding twice: lookup rows are negligible, the
lm_head reads it whole). Writes benchmarks/results/real_model_cpu.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import device_name, record, write_json  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Can you tell me the difference between llamas and alpacas?",
             "Why is the sky blue?", "Write a haiku about the sea.", "What is 12 times 7?",
             "Name three fruits.", "Who wrote Hamlet?", "Explain photosynthesis briefly."]


def copy_bandwidth(size_mib: int = 1024, reps: int = 5) -> float:
    a = torch.empty(size_mib << 18, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(reps))
    return 2 * a.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prompts_for(llm, batch: int) -> list[list[int]]:
    from engine.tokenizer.chat_template import conversation_prompts, load_chat_template
    convs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(batch)]
    return [p["prompt_token_ids"] for p in conversation_prompts(llm.get_tokenizer(),
                                                                load_chat_template(llm.model_dir), convs)]


def run_engine(llm, prompts, new):
    from engine import SamplingParams
    # Warm-up at the timed shapes with other tokens, so no timed prefill hits the prefix cache.
    vocab = llm.config.vocab_size
    llm.generate([{"prompt_token_ids": [100 + (t * 7 + 13) % (vocab - 200) for t in p]} for p in prompts],
                 SamplingParams(temperature=0, max_tokens=new, ignore_eos=True), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=new, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], time.perf_counter() - t


def run_hf(model, prompts, new, pad_id):
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (n - len(p)) + p for p in prompts])      # left padding
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id,
              attention_mask=mask)
    with torch.no_grad():
        model.generate(ids, **kw)                                             # warm-up, same shapes
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        dt = time.perf_counter() - t
    return out[:, n:].tolist(), dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    from transformers import LlamaForCausalLM

    from engine import LLM
    from engine.model.pypi_models import pypi_model_dir
    path = pypi_model_dir("smollm2")
    llm = LLM(path, device="cpu", show_progress=False)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    weight_bytes = sum(p.numel() * 4 for p in hf.parameters())
    if hf.config.tie_word_embeddings:
        weight_bytes += hf.lm_head.weight.numel() * 4       # read by the embedding's lm_head use
    bw = copy_bandwidth()
    print(f"{device_name()}: copy bandwidth {bw / 1e9:.1f} GB/s; {weight_bytes / 1e6:.0f} MB of weights "
          f"per decode step -> ceiling {bw / weight_bytes:.1f} steps/s")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = prompts_for(llm, batch)
        ours, t_ours = run_engine(llm, prompts, args.new_tokens)
        ref, t_hf = run_hf(hf, prompts, args.new_tokens, llm.get_tokenizer().pad_token_id)
        # HF's min_new_tokens masks EOS while the engine's ignore_eos only keeps going past
        # it, so the two agree up to the engine's first EOS and not necessarily after it.
        eos = llm.get_tokenizer().eos_token_id
        cut = [o.index(eos) if eos in o else len(o) for o in ours]
        same = sum(a[:k] == b[:k] for a, b, k in zip(ours, ref, cut))
        row = dict(batch=batch, new_tokens=args.new_tokens, engine_s=t_ours, hf_s=t_hf,
                   engine_tok_s=batch * args.new_tokens / t_ours, hf_tok_s=batch * args.new_tokens / t_hf,
                   engine_over_hf=t_hf / t_ours, identical_up_to_eos=f"{same}/{batch}",
                   engine_bandwidth_fraction=args.new_tokens / t_ours * weight_bytes / bw,
                   hf_bandwidth_fraction=args.new_tokens / t_hf * weight_bytes / bw)
        rows.append(row)
        print(f"batch {batch:3d}: engine {row['engine_tok_s']:7.1f} tok/s, HF {row['hf_tok_s']:7.1f} tok/s "
              f"({row['engine_over_hf']:.2f}x); weight streaming at {row['engine_bandwidth_fraction']:.0%} "
              f"of copy (HF {row['hf_bandwidth_fraction']:.0%}); greedy tokens identical up to EOS {same}/{batch}")
    write_json("real_model_cpu.json", record(device=device_name(), model="SmolLM2-135M-Instruct (Q4_1 GGUF "
                                             "dequantized to fp32)", copy_bytes_per_s=bw,
                                             weight_bytes_per_step=weight_bytes, threads=torch.get_num_threads(),
                                             rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
