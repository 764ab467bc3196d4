"""CUDA-graph decode: bucket choice and padding on CPU, the static-buffer path
(eager replay) on CPU, graphs on vs off on CUDA (GPU check)."""
import pytest
import torch

from engine import SamplingParams
from engine.cuda_graphs import DecodeGraphRunner, graph_buckets, pad_decode_batch, pick_bucket
from tests.helpers import DEVICE, make_checkpoint, make_llm, token_prompts


def test_buckets_and_pick():
    assert graph_buckets(1) == [1]
    assert graph_buckets(6) == [1, 2, 4, 6]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    b = graph_buckets(48)
    assert [pick_bucket(n, b) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    assert pick_bucket(49, b) is None
    with pytest.raises(ValueError):
        graph_buckets(0)


def test_padding_rows_write_nothing_and_attend_to_nothing():
    host = dict(input_ids=[5, 6, 7], positions=[9, 3, 20], slots=[40, 17, 99], ctx=[10, 4, 21],
                tables=[[2, 3], [1], [4, 5, 6]], qsl=[0, 1, 2, 3], last=[0, 1, 2])
    p = pad_decode_batch(host, 4, max_blocks=4)
    assert p["input_ids"] == [5, 6, 7, 0] and p["positions"] == [9, 3, 20, 0]
    assert p["slots"] == [40, 17, 99, -1] and p["ctx"] == [10, 4, 21, 0]
    assert p["tables"] == [[2, 3, 0, 0], [1, 0, 0, 0], [4, 5, 6, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError):
        pad_decode_batch(host, 2, max_blocks=4)
    with pytest.raises(ValueError):
        pad_decode_batch(host, 4, max_blocks=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("graphs")
    cfg = make_checkpoint(path, num_key_value_heads=2)
    return str(path), cfg


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_buffer_path_gives_the_eager_tokens(ckpt, backend):
    """The padded static-buffer decode (what a graph replays), run eagerly on CPU:
    with the reference ops, and with the Triton kernels (interpreter) at the
    graph's fixed split count and its padding rows (slot -1, context 0)."""
    path, cfg = ckpt
    prompts = token_prompts(3, cfg.vocab_size, seed=4)
    sp = SamplingParams(temperature=0, max_tokens=12 if backend == "triton" else 20, ignore_eos=True)
    eager = make_llm(path, show_progress=False, block_size=8, max_model_len=128)
    want = [o.outputs[0].token_ids for o in eager.generate([{"prompt_token_ids": p} for p in prompts],
                                                           sp, use_tqdm=False)]
    llm = make_llm(path, show_progress=False, block_size=8, max_model_len=128, max_num_seqs=6,
                   kernel_backend=backend)
    llm.graph_runner = DecodeGraphRunner(llm.model, llm.runner.kv_caches, 8, 6, 128,
                                         num_splits=lambda b: 3 if backend == "triton" else None,
                                         use_graphs=False)
    calls = []
    real = llm.graph_runner.run
    llm.graph_runner.run = lambda host: calls.append(len(host["ctx"])) or real(host)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                        sp, use_tqdm=False)]
    assert got == want
    assert calls and set(calls) == {3}          # every decode step went through the padded path


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: GPU check only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_graphs_on_and_off_give_identical_greedy_tokens(ckpt, dtype):
    path, cfg = ckpt
    prompts = token_prompts(5, cfg.vocab_size, seed=6)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = []
    for eager in (True, False):
        llm = make_llm(path, show_progress=False, dtype=dtype, enforce_eager=eager, max_num_seqs=8)
        assert (llm.graph_runner is None) == eager
        outs.append([o.outputs[0].token_ids for o in
                     llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)])
    assert outs[0] == outs[1]
