"""Turns scheduled sequences into tensors, runs the model, owns the KV pool.

``prepare`` packs a prefill batch from the sequences' lists (a step of many new
tokens, rare next to decode steps); ``LLM.step`` runs the model on it. Decode
steps get their inputs from persistent buffers instead (engine/worker/decode_inputs.py,
through engine/worker/cuda_graphs.py's DecodeRunner).
"""
from __future__ import annotations

import math
import mmap

import torch

from engine.core.sequence import Sequence
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from kernels.metadata import AttentionMetadata


def lazy_zeros(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages are committed only when first written: it lives in
    an anonymous memory map (zero pages from the OS), so a KV pool costs RSS for the
    blocks in use, not for its size. torch.zeros would write every page up front: 2-5 s
    and 2.3 GB of RSS for a 2 GiB pool on the CPU VM."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, 1))        # the tensor keeps the map alive
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)


class ModelRunner:
    def __init__(self, model: LlamaModel, block_size: int, num_blocks: int):
        cfg: ModelConfig = model.cfg
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One pool [L, 2, num_blocks, block_size, Hkv, D]; per-layer (k, v) views.
        shape = (cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads,
                 cfg.head_dim)
        if self.device.type == "cpu":
            self.kv_pool = lazy_zeros(shape, model.dtype)
        else:
            self.kv_pool = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.kv_caches = [(self.kv_pool[i, 0], self.kv_pool[i, 1])
                          for i in range(cfg.num_hidden_layers)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """KV of block ``src`` into block ``dst`` for each pair, every layer (forks)."""
        if copies:
            src = torch.tensor([a for a, _ in copies], device=self.device)
            dst = torch.tensor([b for _, b in copies], device=self.device)
            self.kv_pool[:, :, dst] = self.kv_pool[:, :, src]      # [L, 2, n, bs, Hkv, D]

    def _tensor(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return self._tensor(rows, torch.int32)

    def host_batch(self, seqs: list[Sequence], is_prefill: bool) -> dict:
        """The step's inputs as host lists (plain Python, no device work).

        Prefill computes positions [num_cached_tokens, len) of each sequence;
        decode computes position len-1 (the token sampled last step).
        """
        bs = self.block_size
        input_ids, positions, slots, qsl, ctx, last = [], [], [], [0], [], []
        for seq in seqs:
            start = seq.num_cached_tokens if is_prefill else len(seq) - 1
            n = len(seq)
            input_ids.extend(seq.token_ids[start:n])
            positions.extend(range(start, n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, n))
            qsl.append(qsl[-1] + n - start)
            ctx.append(n)
            last.append(qsl[-1] - 1)
        return dict(input_ids=input_ids, positions=positions, slots=slots, qsl=qsl, ctx=ctx,
                    last=last, tables=[s.block_table for s in seqs])

    def prepare(self, seqs: list[Sequence], is_prefill: bool):
        """Returns (input_ids [T], positions [T], meta, last_index [B]) on the device."""
        h = self.host_batch(seqs, is_prefill)
        qsl, ctx = h["qsl"], h["ctx"]
        meta = AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=self._tensor(h["slots"], torch.int64),
            block_tables=self._block_tables(seqs),
            context_lens=self._tensor(ctx, torch.int32),
            query_start_loc=self._tensor(qsl, torch.int32),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_context_len=max(ctx),
            host_query_start_loc=qsl,
            host_context_lens=ctx,
        )
        return (self._tensor(h["input_ids"], torch.int64), self._tensor(h["positions"], torch.int64),
                meta, self._tensor(h["last"], torch.int64))
