"""The whole engine on the Triton backend (interpreter on CPU, compiled on GPU) vs HF."""
import os
import subprocess
import sys

import pytest

from engine import SamplingParams
from tests.helpers import DEVICE, hf_greedy, hf_model, make_checkpoint, make_llm, token_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_triton_backend_greedy_matches_hf(tmp_path, kv_heads):
    cfg = make_checkpoint(tmp_path, num_key_value_heads=kv_heads, num_hidden_layers=2)
    prompts = token_prompts(2, cfg.vocab_size, seed=21, min_len=5, max_len=30)
    llm = make_llm(str(tmp_path), kernel_backend="triton", show_progress=False, block_size=8)
    assert llm.model.ops.name == "triton"
    new = 12
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=new, ignore_eos=True,
                                       logprob_token_ids=[0, 7]), use_tqdm=False)
    hf = hf_model(tmp_path)
    for p, o in zip(prompts, outs):
        ref, rows = hf_greedy(hf, p, new)
        assert o.outputs[0].token_ids == ref
        lp = o.outputs[0].logprobs[3][7].logprob
        assert lp == pytest.approx(float(rows[3][7]), abs=1e-3)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only check")
def test_triton_backend_without_interpreter_says_how(tmp_path):
    make_checkpoint(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from engine import LLM\n"
            f"LLM({str(tmp_path)!r}, kernel_backend='triton', device='cpu', show_progress=False)\n")
    p = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "TRITON_INTERPRET=1" in p.stderr and "kernel_backend='torch'" in p.stderr
