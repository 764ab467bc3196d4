"""How many KV-cache blocks the engine allocates by default (``default_num_blocks``), and
what one block costs (``kv_bytes_per_block``): KV sizing in one place.

GPU: measure, then divide. After the weights are loaded, one dummy forward
at the largest batch the scheduler can issue is run under torch's peak-memory
counters (``profile_peak_activation``); the KV pool then gets what is left of
``gpu_memory_utilization`` of the device once the memory already in use, that
peak and a fixed reserve are taken out (``kv_blocks_for_memory``). The idea is
vLLM's (``determine_num_available_blocks``: a profile run, then "whatever is
free goes to the cache"); the code here is this engine's own.

CPU: no measurement; enough blocks for ``max_num_seqs`` full-length
sequences, capped at 2 GiB (``cpu_default_blocks``). The CPU pool is an anonymous
memory map whose pages are committed when first written, so its size costs address
space, not RSS: resident memory follows the blocks in use (freed blocks are reused
first) and the prefix cache.

Everything that touches CUDA is in ``measure_gpu_memory`` and behind the
``MemoryCounters`` protocol of ``profile_peak_activation``, so the arithmetic
and the dummy batches run (and are tested) on CPU.
"""
from __future__ import annotations

import dataclasses
import gc
import sys
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from kernels.metadata import AttentionMetadata

GiB = 1 << 30
MiB = 1 << 20

CPU_KV_CAP_BYTES = 2 * GiB
"""CPU default pool: at most 2 GiB."""

DEFAULT_RESERVE_BYTES = 1 * GiB
"""Safety reserve kept out of the KV pool on the GPU, on top of the measured
peak activation. It covers what the profile run cannot see: the memory pool
of the CUDA graphs captured after the pool is allocated (decode graphs up to
``max_num_seqs`` rows: a few hundred MiB for a 7B with the Triton kernels;
vLLM reports 0.2-1 GiB for 7B-13B models), caching-allocator fragmentation
(the profile measures *allocated* bytes, the allocator *reserves* whole
segments), and small late allocations (pinned staging, Triton launch
metadata). 1 GiB is ~1.3% of an 80 GB card: ~2k tokens of a 7B's cache."""

FRAGMENTATION_RESERVE_BYTES = GiB // 2
"""With the CUDA graphs' pool estimated (``graph_pool_estimate``), what the reserve keeps
besides it: fragmentation and small late allocations. The reserve is the larger of
``DEFAULT_RESERVE_BYTES`` and this plus the estimate."""

GRAPH_POOL_SAFETY = 2
"""``graph_pool_estimate``'s formula times this: on the H200 (2026-11-30) the decode
graphs of a 7B at 256 sequences took 210 MB of device memory (free memory before and
after capture) where the formula gives ~111 MB (65 MB of output logits, 46 MB of
activations): split-KV scratch, cuBLAS workspaces and the pool's rounding are not in it."""

SAMPLER_FP32_COPIES = 8
"""Sampler temporaries, estimated (not measured) as this many fp32
``[max_num_seqs, vocab]`` tensors alive at once. Counted from
engine/sampling/sampler.py's worst path (logits processors + mixed greedy/sampled
rows + top-k/top-p): the processors' clone (1), the sampled rows' gather (1),
probs (1), sorted probs (1), the sort's int64 order (2), cumsum and
``before`` (2) = 8. The log-prob ranks ``[n, K, V]`` bool that come later
need K/4 copies, within 8 for K <= 32 (20 top log-probs + the sampled id +
a few requested ids). The raw logits themselves are in the measured peak."""


# ---- the engine's default ---------------------------------------------------------
def kv_bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block: K and V of ``block_size`` tokens in every layer."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def graph_pool_estimate(peak_activation_bytes: int, max_num_batched_tokens: int, vocab_size: int,
                        max_num_seqs: int, verify_query_len: int = 1, prefill_max_tokens: int = 0,
                        prefill_max_seqs: int = 0) -> int:
    """Bytes the CUDA graphs' shared pool will hold, estimated before the KV pool exists:

        outputs     every graph's fp32 logits stay allocated: decode graphs sum(buckets)
                    rows, verify graphs verify_query_len x that, prefill graphs
                    prefill_max_seqs rows per token bucket; x vocab x 4 B
        activation  the largest graph's temporaries (freed after capture, reused by the
                    next): the profiled peak scaled by its rows over the profile's
                    max_num_batched_tokens (at most 1x)
        estimate    GRAPH_POOL_SAFETY x (outputs + activation)

    7B, 256 sequences, V = 32016: decode 511 rows = 65 MB of logits; with k = 4 verify
    graphs another 327 MB (5 x 511 rows); prefill graphs 16..512 tokens x 16 rows, 12 MB."""
    from engine.worker.cuda_graphs import graph_buckets
    from engine.worker.prefill_graphs import token_buckets
    decode_rows = sum(graph_buckets(max_num_seqs))
    rows = decode_rows * (1 + (verify_query_len if verify_query_len > 1 else 0))
    if prefill_max_tokens:
        rows += len(token_buckets(prefill_max_tokens)) * prefill_max_seqs
    largest = max(max_num_seqs * verify_query_len, prefill_max_tokens)
    activation = peak_activation_bytes * min(1.0, largest / max(1, max_num_batched_tokens))
    return int(GRAPH_POOL_SAFETY * (rows * vocab_size * 4 + activation))


def default_num_blocks(model, block_size: int, max_num_seqs: int, max_model_len: int,
                       max_num_batched_tokens: int, gpu_memory_utilization: float,
                       verbose: bool = False, graphs: dict | None = None) -> tuple[int, dict | None]:
    """(KV blocks when ``num_kv_blocks`` is not given, the GPU sizing's record or None).

    CUDA: profile one forward at the largest batch the scheduler can issue, then give the
    cache ``gpu_memory_utilization`` of the device minus what is in use, the peak
    activation and a reserve (one line printed with ``verbose``): the CUDA graphs' pool
    (``graphs``: ``graph_pool_estimate``'s keyword arguments past the profile's, None when
    no graph will be captured) plus fragmentation, at least ``DEFAULT_RESERVE_BYTES``. CPU: ``max_num_seqs``
    full sequences, at most 2 GiB (lazily committed: see model_runner.lazy_zeros). Must
    run before the KV pool or CUDA graphs exist."""
    per_block = kv_bytes_per_block(model.cfg, block_size, model.dtype)
    if model.device.type != "cuda":
        return cpu_default_blocks(max_num_seqs, max_model_len, block_size, per_block), None
    report = measure_gpu_memory(model, max_num_batched_tokens, max_num_seqs, max_model_len, block_size)
    pool = 0 if graphs is None else graph_pool_estimate(
        report.peak_activation_bytes, max_num_batched_tokens, model.cfg.vocab_size, max_num_seqs, **graphs)
    reserve = max(DEFAULT_RESERVE_BYTES, FRAGMENTATION_RESERVE_BYTES + pool)
    blocks = kv_blocks_for_memory(report, gpu_memory_utilization, per_block, reserve)
    text = describe(blocks, block_size, per_block, report) + f"; reserve {_gib(reserve)} GiB (graphs ~{_gib(pool)})"
    if verbose:
        print(text, file=sys.stderr)
    check_fits_one_sequence(blocks, block_size, max_model_len, report, gpu_memory_utilization, per_block,
                            reserve)
    return blocks, dict(text=text, blocks=blocks, bytes_per_block=per_block, reserve_bytes=reserve,
                        graph_pool_estimate_bytes=pool, **dataclasses.asdict(report))


# ---- the arithmetic -----------------------------------------------------------
@dataclass(frozen=True)
class MemoryReport:
    """What the GPU looked like after loading the weights and profiling.

    total_bytes: device memory (``torch.cuda.mem_get_info``'s total).
    free_bytes_after_load: free device memory with the weights loaded and the
        profile run's tensors freed and returned (``empty_cache``), i.e.
        total minus weights, CUDA context, cuBLAS workspaces, Triton modules,
        other live torch tensors (RoPE tables) and other processes.
    peak_activation_bytes: the profile forward's peak allocation above what
        was allocated before it, plus the logits and the sampler estimate
        (``profile_peak_activation``).
    weights_bytes: the model's parameters (``LlamaModel.num_bytes``); only
        reported, already inside ``total - free``.
    """

    total_bytes: int
    free_bytes_after_load: int
    peak_activation_bytes: int
    weights_bytes: int = 0

    @property
    def used_bytes(self) -> int:
        """Bytes in use before the KV pool exists (weights, context, ...)."""
        return self.total_bytes - self.free_bytes_after_load


def kv_budget_bytes(report: MemoryReport, gpu_memory_utilization: float,
                    reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> int:
    """``floor(util * total) - used - peak_activation - reserve``; may be negative."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    return (int(gpu_memory_utilization * report.total_bytes) - report.used_bytes
            - report.peak_activation_bytes - reserve_bytes)


def kv_blocks_for_memory(report: MemoryReport, gpu_memory_utilization: float,
                         bytes_per_block: int, reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> int:
    """KV blocks that fit in the engine's share of the GPU; never negative.

        budget = floor(util * total)        the engine's share of the device
                 - (total - free_after_load)  already used: weights, CUDA context,
                                              torch's other allocations, other processes
                 - peak_activation            the profile forward + logits + sampler
                 - reserve                    CUDA graphs, fragmentation (1 GiB)
        blocks = max(budget // bytes_per_block, 0)

    ``free_after_load`` must be read after the profile run's memory was
    returned to the driver, or the activation peak would count twice.

    Worked example: Llama-2-7B in fp16 on an 80 GB H100, block_size 16, util 0.9
    (round illustrative numbers: mem_get_info's total is a little under 80 GiB
    on a real card, and the context and peak come from the measurement):

        total            = 80 GiB                     = 85,899,345,920
        weights          = 6,738,415,616 params x 2 B = 13,476,831,232 (12.55 GiB)
        CUDA context etc = 512 MiB                    =    536,870,912
        used             = total - free_after_load    = 14,013,702,144 (13.05 GiB)
        peak activation  = 768 MiB                    =    805,306,368
        reserve          = 1 GiB                      =  1,073,741,824
        0.9 x total      = 77,309,411,328
        budget           = 77,309,411,328 - 14,013,702,144 - 805,306,368
                           - 1,073,741,824            = 61,416,660,992 (57.20 GiB)
        bytes per block  = 2 (K,V) x 32 layers x 16 tokens x 32 heads x 128 x 2 B
                         = 8,388,608 (8 MiB; 512 KiB per token)
        blocks           = 61,416,660,992 // 8,388,608 = 7321
                           = 117,136 tokens = 28 full 4096-token sequences.
    """
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be > 0, got {bytes_per_block}")
    return max(kv_budget_bytes(report, gpu_memory_utilization, reserve_bytes) // bytes_per_block, 0)


def cpu_default_blocks(max_num_seqs: int, max_model_len: int, block_size: int,
                       bytes_per_block: int, cap_bytes: int = CPU_KV_CAP_BYTES) -> int:
    """CPU default: blocks for ``max_num_seqs`` sequences of ``max_model_len``
    tokens, but at most ``cap_bytes`` of them (and at least one block)."""
    full = max_num_seqs * -(-max_model_len // block_size)
    return max(min(full * bytes_per_block, cap_bytes) // bytes_per_block, 1)


def check_fits_one_sequence(num_blocks: int, block_size: int, max_model_len: int,
                            report: MemoryReport | None = None,
                            gpu_memory_utilization: float | None = None,
                            bytes_per_block: int | None = None,
                            reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> None:
    """Raises ValueError when ``num_blocks`` cannot hold one ``max_model_len``
    sequence; with a ``report`` the message shows where the memory went."""
    need = -(-max_model_len // block_size)
    if num_blocks >= need:
        return
    msg = (f"the KV cache ({num_blocks} blocks of {block_size} tokens) cannot hold one "
           f"sequence of max_model_len={max_model_len} ({need} blocks")
    if bytes_per_block:
        msg += f", {_gib(need * bytes_per_block)} GiB"
    msg += ")"
    if report is not None and gpu_memory_utilization is not None:
        r = report
        budget = kv_budget_bytes(r, gpu_memory_utilization, reserve_bytes)
        msg += (f": gpu_memory_utilization={gpu_memory_utilization} of {_gib(r.total_bytes)} GiB "
                f"= {_gib(int(gpu_memory_utilization * r.total_bytes))} GiB, minus "
                f"{_gib(r.used_bytes)} GiB in use after loading (weights "
                f"{_gib(r.weights_bytes)} GiB), minus the profiled peak activation "
                f"{_gib(r.peak_activation_bytes)} GiB, minus a {_gib(reserve_bytes)} GiB reserve "
                f"leaves {_gib(budget)} GiB for the cache")
    raise ValueError(msg + "; raise num_kv_blocks/gpu_memory_utilization or lower max_model_len"
                     + (" (or max_num_batched_tokens/max_num_seqs, which size the activation "
                        "peak)" if report is not None else ""))


def describe(num_blocks: int, block_size: int, bytes_per_block: int,
             report: MemoryReport | None = None) -> str:
    """The one-line summary ``LLM`` prints after sizing the cache."""
    line = (f"KV cache: {num_blocks} blocks x {block_size} tokens = {num_blocks * block_size} "
            f"tokens, {_gib(num_blocks * bytes_per_block)} GiB")
    if report is not None:
        line += (f"; peak activation {_gib(report.peak_activation_bytes)} GiB, weights "
                 f"{_gib(report.weights_bytes)} GiB, in use after load {_gib(report.used_bytes)}"
                 f" of {_gib(report.total_bytes)} GiB")
    return line


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


# ---- the dummy batches ----------------------------------------------------------
class Layout(NamedTuple):
    """One batch shape to profile: per-sequence context and query lengths."""

    is_prefill: bool
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    share_blocks: bool = False    # every sequence reads the same blocks (decode)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


def profile_layouts(max_num_batched_tokens: int, max_num_seqs: int,
                    max_model_len: int | None = None) -> list[Layout]:
    """The batches whose activation peak bounds any step the scheduler issues.

    1. prefill of ``T = max_num_batched_tokens`` tokens spread as evenly as
       possible over ``min(max_num_seqs, T)`` sequences (vLLM's profile
       batch; ``T`` is capped at ``max_num_seqs * max_model_len``);
    2. prefill of one ``max_model_len`` sequence: the scheduler always admits
       a step's first prefill, so one long prompt (or a preempted sequence
       being recomputed) may exceed ``max_num_batched_tokens``, and
       attention backends that are quadratic per sequence (the PyTorch
       reference) peak here, not in (1);
    3. decode of ``max_num_seqs`` sequences at context ``max_model_len``
       (backends that gather a padded [B, Hkv, L, D] copy of K/V, like the
       reference's decode, peak here).

    (2) and (3) need ``max_model_len``; (2) is left out when (1) already is one
    sequence at least that long.
    """
    if max_num_batched_tokens < 1 or max_num_seqs < 1:
        raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
    total = max_num_batched_tokens
    if max_model_len is not None:
        total = min(total, max_num_seqs * max_model_len)
    n = min(max_num_seqs, total)
    lens = tuple(total // n + (i < total % n) for i in range(n))
    layouts = [Layout(True, lens, lens)]
    if max_model_len is not None:
        if not (n == 1 and lens[0] >= max_model_len):
            layouts.append(Layout(True, (max_model_len,), (max_model_len,)))
        layouts.append(Layout(False, (max_model_len,) * max_num_seqs, (1,) * max_num_seqs,
                              share_blocks=True))
    return layouts


@dataclass
class DummyBatch:
    """Inputs of one dummy forward, built like ``ModelRunner.prepare`` builds a
    real step's, over a throwaway KV cache."""

    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64
    meta: AttentionMetadata
    last_index: torch.Tensor         # [B] int64: each sequence's last query row
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    num_cache_blocks: int


def build_dummy_batch(model, layout: Layout, block_size: int) -> DummyBatch:
    """Metadata, inputs and a small KV cache for ``layout`` on ``model.device``.

    The throwaway cache is one layer's worth of blocks, ``(k, v)`` each
    ``[num_blocks, block_size, Hkv, D]``, shared by every layer (each layer
    writes its K/V there and reads them back: same kernels, same shapes, same
    temporaries as a real step; the values are irrelevant). It holds
    ``sum(ceil(ctx_i / block_size))`` blocks with distinct blocks per
    sequence, or ``ceil(max ctx / block_size)`` when ``share_blocks`` (all
    sequences' tables list the same blocks; their decode writes then land in
    the same slots, harmlessly). For a 7B that is 256 KiB per 16 tokens: 64 MiB
    for 4096 tokens, instead of the real cache's 2 GiB.
    """
    cfg = model.cfg
    bs = block_size
    nblocks = [-(-c // bs) for c in layout.context_lens]
    tables, next_block = [], 0
    for nb in nblocks:
        if layout.share_blocks:
            tables.append(list(range(nb)))
        else:
            tables.append(list(range(next_block, next_block + nb)))
            next_block += nb
    num_cache_blocks = max(nblocks) if layout.share_blocks else next_block

    positions, slots, qsl, last = [], [], [0], []
    for ctx, q, table in zip(layout.context_lens, layout.query_lens, tables):
        if not 1 <= q <= ctx:
            raise ValueError(f"query length {q} must be in [1, context length {ctx}]")
        pos = range(ctx - q, ctx)
        positions.extend(pos)
        slots.extend(table[p // bs] * bs + p % bs for p in pos)
        qsl.append(qsl[-1] + q)
        last.append(qsl[-1] - 1)
    width = max(nblocks)
    dev = model.device

    def t(data, dtype):
        return torch.tensor(data, dtype=dtype, device=dev)

    meta = AttentionMetadata(
        is_prefill=layout.is_prefill,
        slot_mapping=t(slots, torch.int64),
        block_tables=t([row + [0] * (width - len(row)) for row in tables], torch.int32),
        context_lens=t(list(layout.context_lens), torch.int32),
        query_start_loc=t(qsl, torch.int32),
        max_query_len=max(layout.query_lens),
        max_context_len=max(layout.context_lens),
    )
    pos_t = t(positions, torch.int64)
    input_ids = pos_t % cfg.vocab_size          # any valid token ids
    shape = (num_cache_blocks, bs, cfg.num_key_value_heads, cfg.head_dim)
    k = torch.zeros(shape, dtype=model.dtype, device=dev)
    v = torch.zeros(shape, dtype=model.dtype, device=dev)
    return DummyBatch(input_ids, pos_t, meta, t(last, torch.int64),
                      [(k, v)] * cfg.num_hidden_layers, num_cache_blocks)


# ---- the measurement ------------------------------------------------------------
class MemoryCounters(Protocol):
    """The allocator counters ``profile_peak_activation`` reads (CUDA's, or a stub)."""

    def synchronize(self) -> None: ...
    def allocated(self) -> int: ...
    def reset_peak(self) -> None: ...
    def peak(self) -> int: ...
    def empty_cache(self) -> None: ...


class CudaCounters:
    """``MemoryCounters`` of one CUDA device (torch's caching allocator)."""

    def __init__(self, device: torch.device):
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def empty_cache(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def sampler_temp_bytes(num_rows: int, vocab_size: int) -> int:
    """Estimated sampler temporaries: ``SAMPLER_FP32_COPIES`` fp32 [n, V] tensors."""
    return SAMPLER_FP32_COPIES * num_rows * vocab_size * 4


@torch.no_grad()
def profile_peak_activation(model, max_num_batched_tokens: int, max_num_seqs: int,
                            max_model_len: int | None = None, block_size: int = 16,
                            counters: MemoryCounters | None = None,
                            details: dict | None = None) -> int:
    """Peak bytes a step allocates on top of the weights and the KV pool.

    For every ``profile_layouts`` batch: build it (``build_dummy_batch``;
    its small cache and inputs are allocated *before* the counters' baseline,
    so they are not counted), reset the peak counter, run
    ``model.forward``, then ``model.compute_logits`` on ``max_num_seqs``
    rows of the hidden states (fp32 [n, V]: a decode step's logits, the
    largest a step makes) while the hidden states are still alive, as in
    ``LLM.step``; the layout's cost is ``max_memory_allocated - baseline``.
    Returns the largest cost plus ``sampler_temp_bytes(max_num_seqs, vocab)``
    (estimated, see ``SAMPLER_FP32_COPIES``; added on top of the peak, which
    over-counts by at most the forward's other temporaries). Everything is
    freed and the allocator's cache emptied before returning.

    ``counters``: default ``CudaCounters(model.device)``; tests pass a stub
    to run the batches on CPU. ``details``, if given, receives each layout's
    measured bytes keyed by ``(is_prefill, num_seqs, num_tokens)``.
    """
    counters = counters if counters is not None else CudaCounters(model.device)
    worst = 0
    for layout in profile_layouts(max_num_batched_tokens, max_num_seqs, max_model_len):
        batch = build_dummy_batch(model, layout, block_size)
        rows = torch.arange(max_num_seqs, device=model.device) % batch.input_ids.shape[0]
        counters.synchronize()
        base = counters.allocated()
        counters.reset_peak()
        try:
            hidden = model.forward(batch.input_ids, batch.positions, batch.meta, batch.kv_caches)
            logits = model.compute_logits(hidden[rows])
            counters.synchronize()
        except torch.cuda.OutOfMemoryError as e:
            raise ValueError(
                f"profiling a {'prefill' if layout.is_prefill else 'decode'} step of "
                f"{layout.num_tokens} tokens over {len(layout.context_lens)} sequences ran out of "
                "GPU memory with only the weights loaded: lower max_num_batched_tokens, "
                "max_num_seqs or max_model_len") from e
        cost = counters.peak() - base
        worst = max(worst, cost)
        if details is not None:
            details[(layout.is_prefill, len(layout.context_lens), layout.num_tokens)] = cost
        del hidden, logits, batch, rows
    counters.empty_cache()
    return worst + sampler_temp_bytes(max_num_seqs, model.cfg.vocab_size)


def measure_gpu_memory(model, max_num_batched_tokens: int, max_num_seqs: int,
                       max_model_len: int, block_size: int) -> MemoryReport:
    """Profiles (``profile_peak_activation``), returns the memory to the
    driver, then reads ``torch.cuda.mem_get_info``. Call it before anything
    else big (the KV pool, CUDA graphs) is allocated."""
    peak = profile_peak_activation(model, max_num_batched_tokens, max_num_seqs,
                                   max_model_len, block_size)
    free, total = torch.cuda.mem_get_info(model.device)
    return MemoryReport(total_bytes=total, free_bytes_after_load=free,
                        peak_activation_bytes=peak, weights_bytes=model.num_bytes())
