"""Default KV-cache sizing (engine/worker/kv_sizing.py), on CPU: the arithmetic with
fake memory reports, the CPU rule, and the profile run's dummy batches."""
import json
import os

import pytest
import torch

from engine import LLM
from engine.core.sequence import Sequence
from engine.model.config import ModelConfig
from engine.worker import kv_sizing as ks
from tests.helpers import BASE

GiB, MiB = 1 << 30, 1 << 20
PER_BLOCK_7B = 2 * 32 * 16 * 32 * 128 * 2          # fp16, block_size 16: 8 MiB


def report(total, used, peak, weights=0):
    return ks.MemoryReport(total_bytes=total, free_bytes_after_load=total - used,
                           peak_activation_bytes=peak, weights_bytes=weights)


# ---- arithmetic -------------------------------------------------------------------
def test_worked_example_7b_h100():
    """The docstring's example, by hand."""
    weights = 6_738_415_616 * 2
    r = report(80 * GiB, weights + 512 * MiB, 768 * MiB, weights)
    assert r.used_bytes == 14_013_702_144
    assert ks.kv_budget_bytes(r, 0.9) == 61_416_660_992
    assert ks.kv_blocks_for_memory(r, 0.9, PER_BLOCK_7B) == 7321
    cfg = ModelConfig.from_dict({**BASE, "hidden_size": 4096, "num_attention_heads": 32,
                                 "num_key_value_heads": 32, "num_hidden_layers": 32})
    assert ks.kv_bytes_per_block(cfg, 16, torch.float16) == PER_BLOCK_7B


def test_small_numbers_by_hand():
    # 0.5 * 1000 = 500; - used 100 - peak 50 - reserve 30 = 320 -> 320 // 64 = 5
    r = report(1000, 100, 50)
    assert ks.kv_blocks_for_memory(r, 0.5, 64, reserve_bytes=30) == 5
    # exactly divisible: 0.5 * 1000 - 100 - 50 - 94 = 256 = 4 * 64
    assert ks.kv_blocks_for_memory(r, 0.5, 64, reserve_bytes=94) == 4
    # one byte short of 4 blocks
    assert ks.kv_blocks_for_memory(r, 0.5, 64, reserve_bytes=95) == 3


def test_utilization_edges():
    r = report(10 * GiB, 2 * GiB, 1 * GiB)
    # util 1.0: the whole card: 10 - 2 - 1 - 1 (reserve) = 6 GiB
    assert ks.kv_blocks_for_memory(r, 1.0, GiB) == 6
    # floor(util * total): 0.75 * 10 GiB = 7.5 GiB -> 3.5 GiB left -> 3 blocks of 1 GiB
    assert ks.kv_blocks_for_memory(r, 0.75, GiB) == 3
    # utilization below what is already used -> negative budget -> 0, not an error here
    assert ks.kv_budget_bytes(r, 0.2) < 0
    assert ks.kv_blocks_for_memory(r, 0.2, GiB) == 0
    for bad in (0, -0.1, 1.01):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            ks.kv_blocks_for_memory(r, bad, GiB)
    with pytest.raises(ValueError, match="bytes_per_block"):
        ks.kv_blocks_for_memory(r, 0.9, 0)


def test_used_memory_includes_other_processes():
    # Same weights, but 20 GiB held by someone else: 20 GiB less cache.
    alone = report(80 * GiB, 14 * GiB, GiB)
    shared = report(80 * GiB, 34 * GiB, GiB)
    assert (ks.kv_blocks_for_memory(alone, 0.9, GiB)
            - ks.kv_blocks_for_memory(shared, 0.9, GiB)) == 20


def test_check_fits_one_sequence_message():
    ks.check_fits_one_sequence(4, 16, 64)                    # exactly one sequence: fine
    with pytest.raises(ValueError, match=r"cannot hold one sequence of max_model_len=65"):
        ks.check_fits_one_sequence(4, 16, 65)
    r = report(16 * GiB, 14 * GiB, 2 * GiB, weights=13 * GiB)
    with pytest.raises(ValueError) as e:
        ks.check_fits_one_sequence(0, 16, 4096, r, 0.9, PER_BLOCK_7B)
    msg = str(e.value)
    for part in ("0 blocks of 16 tokens", "256 blocks, 2.00 GiB", "of 16.00 GiB = 14.40 GiB",
                 "14.00 GiB in use", "weights 13.00 GiB", "peak activation 2.00 GiB",
                 "1.00 GiB reserve", "leaves -2.60 GiB", "gpu_memory_utilization",
                 "max_num_batched_tokens"):
        assert part in msg, (part, msg)


# ---- the CPU rule -----------------------------------------------------------------
def test_cpu_default_rule():
    # 4 seqs x ceil(100 / 16) = 7 blocks = 28 blocks when they fit under the cap
    assert ks.cpu_default_blocks(4, 100, 16, bytes_per_block=1024) == 28
    # 256 x 4096 tokens of a 7B is 2 TiB: capped at 2 GiB = 256 blocks of 8 MiB
    assert ks.cpu_default_blocks(256, 4096, 16, PER_BLOCK_7B) == 256
    assert ks.cpu_default_blocks(256, 4096, 16, PER_BLOCK_7B, cap_bytes=GiB) == 128
    # a block larger than the cap: still one block (the LLM then reports the misfit)
    assert ks.cpu_default_blocks(1, 16, 16, 3 * GiB) == 1


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvcfg")
    (path / "config.json").write_text(json.dumps({**BASE, "num_key_value_heads": 2}))
    return str(path)


def _default_num_blocks(llm, util, verbose=False):
    """The engine's default pool for ``llm``'s model and limits (what LLM() calls)."""
    return ks.default_num_blocks(llm.model, llm.block_size, llm.max_num_seqs, llm.max_model_len,
                                 llm.max_num_batched_tokens, util, verbose)[0]


def test_llm_cpu_default(config_dir):
    llm = LLM(config_dir, load_format="dummy", device="cpu", show_progress=False,
              max_num_seqs=3, max_model_len=100)
    per_block = ks.kv_bytes_per_block(llm.config, 16, torch.float32)
    assert llm.runner.num_blocks == ks.cpu_default_blocks(3, 100, 16, per_block) == 21


def test_llm_level_error(config_dir, monkeypatch):
    # An explicit pool too small: the existing check in LLM.__init__.
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=64"):
        LLM(config_dir, load_format="dummy", device="cpu", show_progress=False,
            num_kv_blocks=3, max_model_len=64)
    # The GPU path with a negative budget, faked: 0 blocks -> the detailed message.
    llm = LLM(config_dir, load_format="dummy", device="cpu", show_progress=False,
              max_model_len=64)
    seen = {}

    def fake_measure(model, tokens, seqs, max_len, block_size):
        seen.update(tokens=tokens, seqs=seqs, max_len=max_len, block_size=block_size)
        return report(8 * GiB, 7 * GiB, 2 * GiB, weights=6 * GiB)

    monkeypatch.setattr(ks, "measure_gpu_memory", fake_measure)
    monkeypatch.setattr(llm.model, "device", torch.device("cuda"))
    with pytest.raises(ValueError, match=r"cannot hold one sequence.*leaves -2\.80 GiB"):
        _default_num_blocks(llm, 0.9)
    assert seen == dict(tokens=2048, seqs=256, max_len=64, block_size=16)
    # and with room: the blocks kv_blocks_for_memory computes, plus a printed line
    monkeypatch.setattr(ks, "measure_gpu_memory",
                        lambda *a: report(8 * GiB, 1 * GiB, GiB // 2, weights=GiB // 2))
    per_block = ks.kv_bytes_per_block(llm.config, 16, llm.model.dtype)
    want = (int(0.9 * 8 * GiB) - GiB - GiB // 2 - GiB) // per_block
    assert _default_num_blocks(llm, 0.9) == want


def test_default_num_blocks_prints_one_line(config_dir, monkeypatch, capsys):
    llm = LLM(config_dir, load_format="dummy", device="cpu", show_progress=False,
              max_model_len=64)
    monkeypatch.setattr(ks, "measure_gpu_memory",
                        lambda *a: report(8 * GiB, GiB, 3 * GiB // 4, weights=GiB // 2))
    monkeypatch.setattr(llm.model, "device", torch.device("cuda"))
    n = _default_num_blocks(llm, 0.5, verbose=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{n} blocks x 16 tokens = {16 * n} tokens" in err[0]
    assert "peak activation 0.75 GiB" in err[0]


# ---- the profile run's dummy batches ----------------------------------------------------
def test_profile_layouts():
    spread, longest, decode = ks.profile_layouts(2048, 256, 4096)
    assert spread.is_prefill and len(spread.context_lens) == 256
    assert spread.num_tokens == 2048 and set(spread.query_lens) == {8}
    assert spread.context_lens == spread.query_lens
    assert longest == ks.Layout(True, (4096,), (4096,))
    assert not decode.is_prefill and decode.share_blocks
    assert decode.context_lens == (4096,) * 256 and decode.query_lens == (1,) * 256
    # uneven split: 10 tokens over 4 seqs -> 3, 3, 2, 2
    assert ks.profile_layouts(10, 4)[0].query_lens == (3, 3, 2, 2)
    # fewer tokens than sequences: one token each
    assert ks.profile_layouts(3, 8)[0].query_lens == (1, 1, 1)
    # the token budget is capped by what max_num_seqs sequences can hold
    assert ks.profile_layouts(10_000, 2, 100)[0].query_lens == (100, 100)
    # one sequence already as long as max_model_len: no separate "longest" layout
    layouts = ks.profile_layouts(4096, 1, 4096)
    assert [l.is_prefill for l in layouts] == [True, False]


def _seqs_for(layout, batch, block_size):
    """Sequences the real ModelRunner.prepare turns into the same batch."""
    tables = batch.meta.block_tables.tolist()
    seqs = []
    for i, (ctx, q) in enumerate(zip(layout.context_lens, layout.query_lens)):
        s = Sequence(list(range(ctx)))
        s.block_table = tables[i][:-(-ctx // block_size)]
        s.num_cached_tokens = ctx - q if layout.is_prefill else 0
        seqs.append(s)
    return seqs


@pytest.mark.parametrize("layout", [
    ks.Layout(True, (5, 16, 33), (5, 16, 33)),
    ks.Layout(True, (40,), (40,)),
    ks.Layout(False, (40,) * 3, (1,) * 3, share_blocks=True),
    ks.Layout(False, (7, 20), (1, 1)),
])
def test_dummy_batch_matches_model_runner(config_dir, layout):
    """The dummy metadata equals what ModelRunner.prepare builds for the same
    sequences (positions, slots, block tables, lengths), and the model runs on it."""
    llm = LLM(config_dir, load_format="dummy", device="cpu", show_progress=False,
              max_model_len=64, num_kv_blocks=8)
    batch = ks.build_dummy_batch(llm.model, layout, 16)
    seqs = _seqs_for(layout, batch, 16)
    input_ids, positions, meta, last = llm.runner.prepare(seqs, layout.is_prefill)
    assert torch.equal(batch.positions, positions)
    assert torch.equal(batch.last_index, last)
    for f in ("slot_mapping", "block_tables", "context_lens", "query_start_loc"):
        assert torch.equal(getattr(batch.meta, f), getattr(meta, f)), f
    assert (batch.meta.is_prefill, batch.meta.max_query_len, batch.meta.max_context_len) == \
        (meta.is_prefill, meta.max_query_len, meta.max_context_len)
    assert batch.input_ids.shape == input_ids.shape
    assert int(batch.input_ids.max()) < llm.config.vocab_size
    # every slot written lies in the throwaway cache, which is small
    k, v = batch.kv_caches[0]
    cap = batch.num_cache_blocks * 16
    assert int(batch.meta.slot_mapping.max()) < cap and int(batch.meta.slot_mapping.min()) >= 0
    assert int(batch.meta.block_tables.max()) < batch.num_cache_blocks
    expect_blocks = (-(-max(layout.context_lens) // 16) if layout.share_blocks
                     else sum(-(-c // 16) for c in layout.context_lens))
    assert batch.num_cache_blocks == expect_blocks
    assert all(kv[0] is k and kv[1] is v for kv in batch.kv_caches)     # shared by layers
    hidden = llm.model.forward(batch.input_ids, batch.positions, batch.meta, batch.kv_caches)
    assert hidden.shape == (layout.num_tokens, llm.config.hidden_size)
    assert torch.isfinite(llm.model.compute_logits(hidden[batch.last_index])).all()


def test_dummy_prefill_matches_real_forward(config_dir):
    """On a fresh cache, the dummy prefill computes what the engine computes."""
    llm = LLM(config_dir, load_format="dummy", device="cpu", show_progress=False,
              max_model_len=64, num_kv_blocks=8)
    layout = ks.Layout(True, (5, 16, 33), (5, 16, 33))
    batch = ks.build_dummy_batch(llm.model, layout, 16)
    seqs = _seqs_for(layout, batch, 16)
    for s in seqs:      # the same token ids as the dummy batch
        s.token_ids = [p % llm.config.vocab_size for p in range(len(s))]
    input_ids, positions, meta, last = llm.runner.prepare(seqs, True)
    assert torch.equal(batch.input_ids, input_ids)
    ref = llm.model.forward(input_ids, positions, meta, llm.runner.kv_caches)
    got = llm.model.forward(batch.input_ids, batch.positions, batch.meta, batch.kv_caches)
    torch.testing.assert_close(got, ref)


class StubCounters:
    """CPU stand-in for CudaCounters: fixed readings, and a log of the calls."""

    def __init__(self, peaks):
        self.peaks, self.calls, self.i = list(peaks), [], 0

    def synchronize(self):
        self.calls.append("sync")

    def allocated(self):
        return 1000

    def reset_peak(self):
        self.calls.append("reset")

    def peak(self):
        self.i += 1
        return 1000 + self.peaks[self.i - 1]

    def empty_cache(self):
        self.calls.append("empty")


def test_profile_peak_activation_on_cpu(config_dir, monkeypatch):
    llm = LLM(config_dir, load_format="dummy", device="cpu", show_progress=False,
              max_model_len=64, num_kv_blocks=8)
    model = llm.model
    forwards, logit_rows = [], []
    real_forward, real_logits = model.forward, model.compute_logits

    def forward(input_ids, positions, meta, kv_caches):
        forwards.append((meta.is_prefill, meta.num_seqs, input_ids.shape[0]))
        return real_forward(input_ids, positions, meta, kv_caches)

    def compute_logits(hidden):
        out = real_logits(hidden)
        logit_rows.append(out.shape)
        return out

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(model, "compute_logits", compute_logits)
    stub = StubCounters([300, 700, 50])
    details = {}
    got = ks.profile_peak_activation(model, 40, 4, max_model_len=64, block_size=16,
                                     counters=stub, details=details)
    V = llm.config.vocab_size
    assert got == 700 + ks.SAMPLER_FP32_COPIES * 4 * V * 4
    assert ks.sampler_temp_bytes(4, V) == 8 * 4 * V * 4
    assert forwards == [(True, 4, 40), (True, 1, 64), (False, 4, 4)]
    assert logit_rows == [(4, V)] * 3                  # max_num_seqs rows, fp32 [n, V]
    assert details == {(True, 4, 40): 300, (True, 1, 64): 700, (False, 4, 4): 50}
    assert stub.calls.count("reset") == 3 and stub.calls[-1] == "empty"


def test_profile_runs_triton_interpreter(config_dir):
    """The dummy batches also pass the Triton kernels' checks (interpreter on CPU)."""
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on CPU machines)")
    llm = LLM(config_dir, load_format="dummy", device="cpu", show_progress=False,
              max_model_len=32, num_kv_blocks=4, kernel_backend="triton")
    got = ks.profile_peak_activation(llm.model, 24, 3, max_model_len=32, block_size=16,
                                     counters=StubCounters([1, 2, 3]))
    assert got == 3 + ks.sampler_temp_bytes(3, llm.config.vocab_size)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux /proc only")
def test_cpu_pool_costs_rss_only_for_what_is_written():
    """The CPU KV pool is zero, and its pages are committed when first written:
    a 1 GiB pool adds (far) less than 64 MiB of RSS; writing 32 MiB adds about that."""
    from engine.worker.model_runner import lazy_zeros
    before = _rss()
    pool = lazy_zeros((16, 2, 4096, 16, 128), torch.float32)       # 1 GiB
    assert pool.shape == (16, 2, 4096, 16, 128) and pool.is_contiguous()
    assert _rss() - before < 64 << 20
    assert float(pool[3, 1, 100:200].abs().max()) == 0.0             # zeros
    pool[0, 0] = 1.0                                                 # 4096 x 16 x 128 x 4 = 32 MiB
    grown = _rss() - before
    assert 24 << 20 < grown < 96 << 20
    assert float(pool[0, 0].sum()) == 4096 * 16 * 128


def test_graph_pool_estimate_by_hand():
    """The graphs' pool estimate, computed by hand: 7B shapes, 256 sequences."""
    V, peak, tokens = 32016, 768 * 2**20, 4096
    # decode buckets 1..256 = 511 rows of fp32 logits; activation: 256 of 4096 tokens of the peak
    want = 2 * (511 * V * 4 + peak * 256 / 4096)
    assert ks.graph_pool_estimate(peak, tokens, V, 256) == int(want)
    # + verify graphs (k = 4: 5 x 511 rows), + prefill graphs 16..512 (6 buckets x 16 rows);
    # the largest graph: 256 x 5 = 1280 rows
    want = 2 * ((511 * 6 + 6 * 16) * V * 4 + peak * 1280 / 4096)
    assert ks.graph_pool_estimate(peak, tokens, V, 256, verify_query_len=5, prefill_max_tokens=512,
                                  prefill_max_seqs=16) == int(want)
    assert 1.1 * 2**30 < want < 1.3 * 2**30       # 1.22 GiB: past the old flat 1 GiB reserve
    # a profile smaller than the largest graph: the whole peak, not more
    assert ks.graph_pool_estimate(peak, 64, V, 1, prefill_max_tokens=512, prefill_max_seqs=1) == \
        int(2 * ((1 + 6) * V * 4 + peak))
