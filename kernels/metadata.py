"""Explicit metadata handed to the attention and KV-cache ops.

Built by the model runner once per step and shared by every layer. No op
reads hidden globals: everything a kernel needs about the batch is here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Describes one forward step over a packed batch of ``B`` sequences.

    Tokens of all sequences are packed along one axis (``T`` tokens in all).
    Sequence ``i`` contributes the query tokens
    ``query_start_loc[i]:query_start_loc[i+1]``; they are its *last*
    ``q_len_i`` positions, and it attends to ``context_lens[i]`` positions in
    total (cached prefix + the new tokens), all read through its block table.

    Fields (shapes next to them):
      is_prefill       bool  True: queries may be several tokens per sequence
                             (prefill, resumed or forked prefix). False: exactly
                             one query token per sequence (decode).
      slot_mapping     [T]    int64  cache slot (block * block_size + offset) each
                             new token's K/V is written to; -1 = padding, skip.
      block_tables     [B, max_blocks] int32  KV block ids per sequence, padded
                             with 0 beyond the sequence's blocks (never read:
                             masked by context_lens).
      context_lens     [B]    int32  positions each sequence attends to.
      query_start_loc  [B+1]  int32  cumulative query lengths (cu_seqlens_q).
      max_query_len    int    host-side max of query lengths.
      max_context_len  int    host-side max of context_lens.
      scratch          dict   per-step space where a backend may keep what all
                             layers share (e.g. the reference's decode mask).
      num_splits       int|None  split-KV count for decode, fixed when a CUDA graph is
                             captured (one grid must serve every replay); None: the
                             kernel picks from max_context_len.
      query_lens       [B] int32 | None  decode only (is_prefill False): None is one query
                             per sequence. Set, the step verifies drafts: q has
                             B * max_query_len rows, sequence i's are rows
                             i * max_query_len + j, j < query_lens[i], at positions
                             context_lens[i] - query_lens[i] + j, each seeing the keys up
                             to itself; its rows j >= query_lens[i] are padding (zeros
                             out). A fixed layout, so one CUDA graph serves any drafts.
      graph_static     bool  True: a CUDA graph captures this step and replays it for
                             every later step of the same shapes, so launchers choose
                             grids from shapes (and the bounds above) only, never from
                             per-step values read on the host (prefill attention: the
                             dense grid, not the tile map). Prefill query rows past
                             query_start_loc[-1] are then padding, owned by no sequence.
      host_query_start_loc, host_context_lens  list[int]|None: host copies of
                             those tensors, so a launcher that needs them on the host
                             never syncs with the device.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_context_len: int
    scratch: dict = field(default_factory=dict)
    num_splits: int | None = None
    host_query_start_loc: list | None = None
    host_context_lens: list | None = None
    query_lens: torch.Tensor | None = None
    graph_static: bool = False

    @property
    def decode_query_len(self) -> int:
        """Query rows per sequence of a decode step: 1, or max_query_len when verifying."""
        return 1 if self.query_lens is None else self.max_query_len

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]
