"""Shared test utilities: tiny checkpoints in the HF layout and an HF reference."""
from __future__ import annotations

import os

import torch

from engine.model.checkpoint import random_state_dict, save_checkpoint
from engine.model.config import ModelConfig

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


# The GPU check sets SELFRAG_TEST_DEVICE=cuda to run the engine tests on the GPU.
DEVICE = os.environ.get("SELFRAG_TEST_DEVICE", "cpu")

# On CUDA an engine sizes its KV pool to 90% of the GPU by default, so a second test
# engine alive at the same time (a module fixture, a failed test's traceback) would
# find no memory. Test engines there get a fixed small pool and few sequences
# (few graph buckets to capture): 1024 blocks of 16 tokens is 16k tokens, a few
# hundred MiB at most for the test models, and any number of them fit at once.
# They also run in fp32: test checkpoints name no torch_dtype, so "auto" would load fp16
# on CUDA, and the fp32 parity tests would compare an fp16 engine with fp32 HF (the first
# H200 check, 2026-11-30, failed 5 of them that way: ~4e-4 logprob drift per token, near-
# ties flipped). Tests of half precision, or of the production dtype, name their dtype.
CUDA_TEST_DEFAULTS = dict(num_kv_blocks=1024, max_num_seqs=16, dtype=torch.float32)


def make_llm(model, **kw):
    """An LLM on the test device; everything else as the caller says."""
    from engine import LLM
    defaults = {"device": DEVICE, **(CUDA_TEST_DEFAULTS if DEVICE == "cuda" else {})}
    return LLM(model, **{**defaults, **kw})


def make_checkpoint(path, num_shards: int = 1, spelling: int = 4, seed: int = 0,
                    std: float = 0.1, dtype=torch.float32, **overrides) -> ModelConfig:
    """Writes a random Llama checkpoint to ``path`` and returns its config."""
    cfg = ModelConfig.from_dict({**BASE, **overrides})
    save_checkpoint(path, cfg, random_state_dict(cfg, seed=seed, std=std, dtype=dtype),
                    num_shards=num_shards, spelling=spelling)
    return cfg


def hf_model(path, dtype=torch.float32):
    """The transformers reference, on the same device as the engine under test."""
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(DEVICE).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new: int, banned: int | None = None):
    """Plain argmax loop with HF's KV cache. Returns (ids, per-step raw log-softmax rows)."""
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt], device=dev)
    out = model(ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1]
    tokens, logprob_rows = [], []
    for _ in range(max_new):
        logprob_rows.append(torch.log_softmax(logits.float(), -1).cpu())
        masked = logits.clone()
        if banned is not None:
            masked[banned] = float("-inf")
        nxt = int(masked.argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]], device=dev), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return tokens, logprob_rows


def token_prompts(n: int, vocab: int, seed: int = 0, min_len: int = 3, max_len: int = 40):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append([1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist())
    return out


def finish_all(llm) -> dict:
    """Steps ``llm`` until no request is left; returns request id -> final output."""
    finals = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                finals[out.request_id] = out
    return finals
