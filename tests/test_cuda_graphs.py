"""CUDA-graph decode: bucket choice on CPU, the padded persistent-buffer path a graph
replays (run eagerly) on CPU, graphs on vs off on CUDA (GPU check)."""
import pytest
import torch

from engine import SamplingParams
from engine.worker.cuda_graphs import DecodeRunner, graph_buckets, pick_bucket
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
    llm.decode_runner = DecodeRunner(llm.model, llm.runner.kv_caches, 8, 6, 128,
                                     num_splits=lambda b: 3 if backend == "triton" else None,
                                     pad_to_buckets=True)
    calls = []
    real = llm.decode_runner.launch
    llm.decode_runner.launch = lambda step: calls.append(step[:2]) or real(step)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                        sp, use_tqdm=False)]
    assert got == want
    assert calls and set(calls) == {(3, 4)}     # every decode step ran 3 rows padded to 4


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: GPU check only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_graphs_on_and_off_give_identical_greedy_tokens(ckpt, dtype):
    path, cfg = ckpt
    prompts = token_prompts(5, cfg.vocab_size, seed=6)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = []
    for eager in (True, False):
        llm = make_llm(path, show_progress=False, dtype=dtype, enforce_eager=eager, max_num_seqs=8)
        assert llm.cuda_graphs["enabled"] == (not eager), llm.cuda_graphs
        assert llm.prefill_graphs["enabled"] == (not eager), llm.prefill_graphs
        outs.append([o.outputs[0].token_ids for o in
                     llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)])
        if not eager:
            assert llm.prefill_runner.num_replays > 0           # the prompts' prefill replayed a graph
    assert outs[0] == outs[1]


def test_graph_status_is_recorded_and_printed(monkeypatch, capsys):
    """A failed capture falls back to eager with the error recorded and printed; graphs
    switched off say why. (CUDA is faked: the runner's buffers stay on the CPU.)"""
    from types import SimpleNamespace

    import engine.worker.cuda_graphs as cg
    import kernels.triton.decode_attention as da
    fake = SimpleNamespace(device=SimpleNamespace(type="cuda"), ops=SimpleNamespace(name="triton"),
                           cfg=SimpleNamespace(num_key_value_heads=2))
    real_init = cg.DecodeRunner.__init__
    monkeypatch.setattr(cg.DecodeRunner, "__init__", lambda self, model, *a, **kw: real_init(
        self, SimpleNamespace(device=torch.device("cpu")), *a, **kw))

    def boom(self):
        raise RuntimeError("capture exploded")
    monkeypatch.setattr(cg.DecodeRunner, "capture", boom)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(da, "sm_count", lambda device: 132)
    r = cg.build_decode_runner(fake, [], 16, 8, 128, enforce_eager=False)
    assert r.graph_status == dict(enabled=False, reason="capture failed", buckets=[], capture_s=None,
                                  error="RuntimeError: capture exploded")
    assert not r.graphs and not r.pad_to_buckets          # decode runs eagerly
    assert "capture FAILED (RuntimeError: capture exploded)" in capsys.readouterr().err
    r = cg.build_decode_runner(fake, [], 16, 8, 128, enforce_eager=True)
    assert r.graph_status["reason"] == "enforce_eager=True" and r.graph_status["error"] is None
    assert "CUDA graphs: off (enforce_eager=True)" in capsys.readouterr().err
    fake.ops.name = "torch"
    assert "kernel_backend 'torch'" in cg.build_decode_runner(fake, [], 16, 8, 128, False).graph_status["reason"]


def test_cpu_engine_reports_no_graphs(ckpt, capsys):
    llm = make_llm(ckpt[0], show_progress=False, device="cpu")
    assert llm.cuda_graphs == dict(enabled=False, reason="not CUDA", buckets=[], capture_s=None, error=None)
    assert llm.prefill_graphs["enabled"] is False and llm.prefill_runner is None
    assert llm.prefill_graphs["reason"] == "no decode graphs (not CUDA)"
    for bad in (8, 100, -16, 1.5):
        with pytest.raises(ValueError, match="prefill_graph_max_tokens"):
            make_llm(ckpt[0], show_progress=False, device="cpu", prefill_graph_max_tokens=bad)
    assert "CUDA graphs" not in capsys.readouterr().err
    assert set(llm.startup) >= {"load_s", "kv_sizing_s", "kv_alloc_s", "decode_runner_s", "num_kv_blocks"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_verify_path_gives_plain_decodings_tokens(ckpt, backend):
    """Speculative verify steps on the static buffers a verify graph replays, run eagerly on
    CPU: every sequence padded to 1 + k = 5 query rows (fewer drafts, or none, leave padding
    rows with slot -1), batches padded to buckets, the graph's fixed split count. Greedy
    tokens are plain decoding's, token for token, with full, partial and no acceptance."""
    from tests.test_speculative import Oracle
    path, cfg = ckpt
    prompts = token_prompts(3, cfg.vocab_size, seed=8)
    n = 10 if backend == "triton" else 24
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    free = make_llm(path, show_progress=False, block_size=8, max_model_len=128).generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=n + 8, ignore_eos=True),
        use_tqdm=False)
    want = [o.outputs[0].token_ids[:n] for o in free]
    futures = {tuple(p): p + o.outputs[0].token_ids for p, o in zip(prompts, free)}
    llm = make_llm(path, show_progress=False, block_size=8, max_model_len=128, max_num_seqs=6,
                   kernel_backend=backend, speculative_config={"method": "custom", "num_speculative_tokens": 4,
                                                               "proposer": Oracle(futures, wrong=3)})
    llm.decode_runner = DecodeRunner(llm.model, llm.runner.kv_caches, 8, 6, 128,
                                     num_splits=lambda b: 3 if backend == "triton" else None,
                                     pad_to_buckets=True, verify_query_len=5)
    shapes = []
    real = llm.decode_runner.launch
    llm.decode_runner.launch = lambda step: shapes.append(step[:3]) or real(step)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                        sp, use_tqdm=False)]
    assert got == want
    assert (3, 4, 5) in shapes                   # verify steps: 3 sequences, 4 rows of 5 queries
    assert llm.speculator.num_accepted > 0 and llm.speculator.num_drafted > llm.speculator.num_accepted


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_prefill_path_gives_the_eager_tokens(ckpt, backend):
    """Prefill on the static buffers a prefill graph replays, run eagerly on CPU: token
    buckets 16..64, 4 sequence slots (padding slots without queries, padding tokens with
    slot -1), the dense attention grid; prefix-cached prompts and n > 1 samples too. The
    tokens are the eager prefill's; a prompt over the largest bucket, or more sequences
    than the slots, and a step wanting prompt log-probs run eagerly."""
    from engine.worker.prefill_graphs import PrefillRunner
    path, cfg = ckpt
    prompts = token_prompts(3, cfg.vocab_size, seed=5, min_len=5, max_len=30)
    prompts.append(prompts[1][:17] + [7, 8, 9])                   # 2 cached blocks of prompt 1's 23 tokens
    prompts.append(token_prompts(1, cfg.vocab_size, seed=9, min_len=70, max_len=70)[0])  # over 64: eager
    n = 4 if backend == "triton" else 8
    sp = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=n, ignore_eos=True)]
    # steps of <= 32 prompt tokens: two prefill steps of 2 sequences, the 70-token prompt alone (eager)
    kw = dict(show_progress=False, block_size=8, max_model_len=128, max_num_seqs=8, kernel_backend=backend,
              max_num_batched_tokens=32)
    eager = make_llm(path, **kw)
    want = [[c.token_ids for c in o.outputs] for o in eager.generate(
        [{"prompt_token_ids": p} for p in prompts], [sp[i % 2] for i in range(len(prompts))], use_tqdm=False)]
    llm = make_llm(path, **kw)
    llm.prefill_runner = PrefillRunner(llm.model, llm.runner.kv_caches, 8, 128, max_tokens=64, max_seqs=4,
                                       pad_to_buckets=True)
    buckets = []
    real = llm.prefill_runner.launch
    llm.prefill_runner.launch = lambda seqs, b: buckets.append((len(seqs), b)) or real(seqs, b)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [sp[i % 2] for i in range(len(prompts))],
                        use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == want
    assert llm.block_manager.get_stats()["prefix_cache_hit_tokens"] >= 16   # prompt 3 started at 16
    assert len(buckets) >= 2 and all(b in (16, 32, 64) and k <= 4 for k, b in buckets)
    assert any(k > 1 for k, _ in buckets)           # a step of several sequences, padded slots
    assert llm.prefill_runner.bucket_for([_Seq(70)]) is None            # over 64 tokens
    assert llm.prefill_runner.bucket_for([_Seq(3)] * 5) is None                                # over 4 sequences
    assert llm.prefill_runner.bucket_for([_Seq(17), _Seq(3)]) == 32


class _Seq:
    """What bucket_for reads of a sequence."""

    def __init__(self, n):
        self.n, self.num_cached_tokens = n, 0

    def __len__(self):
        return self.n


def test_prefill_graph_status_and_failed_capture(monkeypatch, capsys):
    """build_prefill_runner: off when the decode graphs are off or the bound is 0; a failed
    capture leaves prefill eager with the error recorded and printed; the buckets stop at
    what one step may hold (max_num_batched_tokens)."""
    from types import SimpleNamespace

    import engine.worker.prefill_graphs as pg
    model = SimpleNamespace(device=torch.device("cpu"))
    on = SimpleNamespace(graph_status=dict(enabled=True), pool=None)
    off = SimpleNamespace(graph_status=dict(enabled=False, reason="enforce_eager=True"))
    assert pg.build_prefill_runner(model, [], 16, 256, 8, 2048, off, 512)[1]["reason"] == \
        "no decode graphs (enforce_eager=True)"
    assert pg.build_prefill_runner(model, [], 16, 256, 8, 2048, on, 0)[1]["reason"] == "prefill_graph_max_tokens=0"
    monkeypatch.setattr(pg.PrefillRunner, "capture", lambda self, pool: 0.25)
    runner, st = pg.build_prefill_runner(model, [], 16, 256, 8, 200, on, 512)
    assert st["enabled"] and st["buckets"] == [16, 32, 64, 128] and st["max_seqs"] == 8 and runner.max_tokens == 128
    assert "captured 4 prefill graphs (up to 128 tokens in up to 8 sequences)" in capsys.readouterr().err

    def boom(self, pool):
        raise RuntimeError("prefill capture exploded")
    monkeypatch.setattr(pg.PrefillRunner, "capture", boom)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    runner, st = pg.build_prefill_runner(model, [], 16, 256, 8, 2048, on, 512)
    assert runner is None and st["error"] == "RuntimeError: prefill capture exploded"
    assert "prefill capture FAILED" in capsys.readouterr().err
    with pytest.raises(ValueError, match="power of two >= 16"):
        pg.token_buckets(48)
