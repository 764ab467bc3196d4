"""Sharing a live sequence's blocks: ``fork`` (a child shares the parent's KV) and
``extend`` (a held sequence grows by many tokens, reusing prefix-cache blocks). A mixin
of ``BlockManager`` (engine/core/block_manager.py), plain Python, like engine/core/draft_slots.py.

* ``fork(parent, child)``: the child shares every full covered block of the parent
  (ref count + 1, copy-on-write: a running sequence's partial last block is private) and
  gets a private copy of the partial one; the caller copies its KV.
* ``extend(seq)``: blocks for tokens appended to a held sequence at once; full blocks of
  the new text already in the prefix cache are shared, the rest taken from the pool and
  registered as they fill.

Names of the block manager (the digest, ``NoFreeBlocksError``) are read from its module at
call time: it imports this one.
"""
from __future__ import annotations

from engine.core.sequence import Sequence


class ForkExtendMixin:
    """Needs BlockManager's ``_blocks``, ``_seqs``, ``_num_tokens``, ``_drafts``,
    ``_take_block``, ``_release``, ``_acquire_cached``, ``_lookup``, ``_block_tokens``,
    ``_register_filled``, ``_check_live``, ``blocks_needed``, ``num_free_blocks`` and the
    prefix-cache counters."""

    # ------------------------------------------------------------------- fork
    def can_fork(self, parent: Sequence) -> bool:
        """Whether ``fork(parent, child)`` would succeed (needs one block iff the
        parent's computed tokens end inside a block)."""
        self._check_live(parent, "fork")
        return self._num_tokens[parent.seq_id] % self.block_size == 0 or self.num_free_blocks >= 1

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Let ``child`` (empty table, same token ids) share ``parent``'s KV.

        The parent's KV covers either all its tokens, or all but the last (between
        engine steps: the token sampled last step gets its slot and KV in the next
        decode step); the child then covers as many and gets its own slot for the last
        token from its own ``append_slot``, as the parent does. The child shares every
        FULL covered block of the parent (ref_count += 1) and gets a private copy of
        the last PARTIAL covered block, if any. Returns the ``(src_block, dst_block)``
        copies the runner must perform on the KV tensors before the next forward pass
        (empty when the covered tokens end on a block boundary). Sets
        ``child.num_cached_tokens`` to the covered count. Raises ``NoFreeBlocksError``
        (state unchanged) when no block is free for the copy.
        """
        from engine.core import block_manager as bm
        self._check_live(parent, "fork")
        if self._drafts.get(parent.seq_id):
            raise ValueError(f"fork: {parent!r} has draft slots pending (settle them first)")
        covered = self._num_tokens[parent.seq_id]
        if covered not in (len(parent), len(parent) - 1):
            raise ValueError(f"fork: parent {parent!r} has {len(parent) - covered} tokens without KV "
                             "slots (at most the one sampled last step)")
        if child.block_table or child.seq_id in self._seqs:
            raise ValueError(f"fork: child {child!r} already holds blocks")
        if child.token_ids != parent.token_ids:
            raise ValueError("fork: child token ids differ from the parent's")
        n_full = covered // self.block_size
        partial = covered % self.block_size != 0
        if partial and self.num_free_blocks < 1:
            raise bm.NoFreeBlocksError(f"fork {parent!r}: no free block for the partial-block copy")
        table = list(parent.block_table[:n_full])
        for b in table:
            self._blocks[b].ref_count += 1
        copies: list[tuple[int, int]] = []
        if partial:
            dst = self._take_block()
            copies.append((parent.block_table[n_full], dst))
            table.append(dst)
        child.block_table.extend(table)
        child.num_cached_tokens = covered
        self._seqs[child.seq_id] = child
        self._num_tokens[child.seq_id] = covered
        return copies

    # ----------------------------------------------------------------- extend
    def _plan_extension(self, seq: Sequence, max_hit_tokens: int | None):
        """(prefix-cache hit blocks from the block holding position ``covered`` on,
        blocks to take from the pool, whether the private partial block gives way to
        the first hit). A hit block holds the same tokens after the same prefix, so its
        KV is what this sequence would compute; the last token is always computed."""
        from engine.core import block_manager as bm
        bs, n = self.block_size, len(seq)
        table, covered = seq.block_table, self._num_tokens[seq.seq_id]
        first = covered // bs
        hits: list[int] = []
        if self.enable_prefix_caching:
            prev = bm._ROOT_HASH if first == 0 else self._blocks[table[first - 1]].hash
            cap = (n - 1) // bs
            if max_hit_tokens is not None:
                cap = min(cap, max_hit_tokens // bs)
            for i in range(first, cap):
                if prev is None:
                    break
                tokens = self._block_tokens(seq, i)
                h = bm.compute_block_hash(prev, tokens)
                b = self._lookup(h, tokens)
                if b is None:
                    break
                hits.append(b)
                prev = h
        drop_partial = bool(hits) and len(table) > first
        new = self.blocks_needed(n) - first - len(hits) - (len(table) - first if not hits else 0)
        return hits, new, drop_partial

    def can_extend(self, seq: Sequence, max_hit_tokens: int | None = None) -> bool:
        """Whether ``extend(seq)`` would succeed now."""
        self._check_live(seq, "extend")
        hits, new, drop = self._plan_extension(seq, max_hit_tokens)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        return new <= self.num_free_blocks - revived + int(drop)

    def extend(self, seq: Sequence, max_hit_tokens: int | None = None) -> None:
        """A live ``seq`` (a held request) grew by several tokens at once: give it blocks
        for all of them. Full blocks of the new tokens found in the prefix cache are
        shared, as at ``allocate`` (the first may replace the private block holding the
        last covered positions); ``seq.num_cached_tokens`` is set to the end of the KV
        it now has (at least the old covered count), and the prefill of this step must
        compute the positions from there. Blocks the new tokens fill up are registered
        in the prefix cache. ``max_hit_tokens`` caps the reuse as at ``allocate``.
        Raises ``NoFreeBlocksError`` (state unchanged) when the pool is short."""
        from engine.core import block_manager as bm
        self._check_live(seq, "extend")
        hits, new, drop = self._plan_extension(seq, max_hit_tokens)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        if new > self.num_free_blocks - revived + int(drop):
            raise bm.NoFreeBlocksError(f"extend {seq!r}: need {new} new blocks, {self.num_free_blocks} available")
        table, bs = seq.block_table, self.block_size
        covered = self._num_tokens[seq.seq_id]
        first = covered // bs
        for b in hits:                       # revive/share first, so taking cannot evict them
            self._acquire_cached(b)
        if drop:
            self._release(table.pop(first))
        table.extend(hits)
        for _ in range(new):
            table.append(self._take_block())
        cached = max(covered, (first + len(hits)) * bs) if hits else covered
        self._num_tokens[seq.seq_id] = len(seq)
        if self.enable_prefix_caching:
            self._hits += len(hits)
            self._hit_tokens += max(0, cached - covered)
            for n in range(cached + 1, len(seq) + 1):
                if n % bs == 0:
                    self._register_filled(seq, n)
        seq.num_cached_tokens = cached
