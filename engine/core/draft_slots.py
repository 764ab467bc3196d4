"""KV slots for speculative drafts: reserved for one verify step, then kept for the
accepted tokens and rolled back for the rejected ones. A mixin of ``BlockManager``
(engine/core/block_manager.py), plain Python.

A verify step computes, for a running sequence, its last token (slot given by
``append_slot`` as in any decode step) and k drafted tokens after it. Their slots are
positions ``[len, len + k)``:

* ``reserve_drafts(seq, k)`` gives the sequence blocks up to position ``len + k - 1``.
  Every draft position lies in the sequence's private last block or in a new block: a
  running sequence's partial last block is never shared (forks copy it, the prefix
  cache only shares full blocks), so writing drafts never touches a block another
  sequence holds. A block filled by draft tokens is NOT registered in the prefix cache:
  no other request can hit tokens that may be rejected.
* ``settle_drafts(seq, accepted)``, after the caller appended the accepted drafts and
  the bonus token to ``seq.token_ids``: the accepted positions become covered (their KV
  is the right one), the blocks they fill are registered, and the blocks reserved only
  for rejected drafts go back to the pool (a freed draft block was private and never
  registered). The bonus token gets its slot from the next ``append_slot``, as a
  sampled token does. Rejected drafts' KV left in a kept block is stale past the
  sequence's length, where attention never reads, and is overwritten when the real
  tokens of those positions are computed.
"""
from __future__ import annotations

from engine.core.sequence import Sequence


class DraftSlotsMixin:
    """Needs BlockManager's ``_num_tokens``, ``_drafts``, ``_take_block``, ``_release``,
    ``_register_filled``, ``_check_live``, ``blocks_needed``, ``num_free_blocks``."""

    def num_drafts(self, seq: Sequence) -> int:
        return self._drafts.get(seq.seq_id, 0)

    def can_reserve_drafts(self, seq: Sequence, k: int) -> bool:
        return self._draft_blocks(seq, k) <= self.num_free_blocks

    def _draft_blocks(self, seq: Sequence, k: int) -> int:
        self._check_live(seq, "reserve_drafts")
        covered = self._num_tokens[seq.seq_id]
        if covered != len(seq) or self._drafts.get(seq.seq_id):
            raise ValueError(f"reserve_drafts: {seq!r} needs its last token's slot (append_slot) first, "
                             "and no drafts pending")
        return self.blocks_needed(len(seq) + k) - len(seq.block_table)

    def reserve_drafts(self, seq: Sequence, k: int) -> None:
        """Slots for ``k`` drafts after ``seq``'s last token (``NoFreeBlocksError``,
        state unchanged, if the pool is short: speculate less)."""
        from engine.core.block_manager import NoFreeBlocksError
        if k < 1:
            raise ValueError(f"reserve_drafts: k={k} must be >= 1")
        need = self._draft_blocks(seq, k)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"reserve_drafts {seq!r}: need {need} blocks, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._take_block())
        self._drafts[seq.seq_id] = k

    def settle_drafts(self, seq: Sequence, accepted: int) -> None:
        """After a verify step: ``seq.token_ids`` grew by ``accepted`` drafts plus the
        bonus token. Covers the accepted positions, registers the blocks they fill,
        frees the blocks that only rejected drafts used."""
        self._check_live(seq, "settle_drafts")
        k = self._drafts.pop(seq.seq_id, 0)
        covered = self._num_tokens[seq.seq_id]
        if not 0 <= accepted <= k or len(seq) != covered + accepted + 1:
            raise ValueError(f"settle_drafts: {seq!r} has {len(seq)} tokens; expected {covered} + "
                             f"{accepted} accepted of {k} drafts + 1 bonus token")
        new_covered = covered + accepted
        self._num_tokens[seq.seq_id] = new_covered
        keep = self.blocks_needed(new_covered)
        if len(seq.block_table) > keep:
            for b in reversed(seq.block_table[keep:]):
                self._release(b)
            # a new list: the decode inputs tell a shrunk table from a grown one by identity
            seq.block_table = seq.block_table[:keep]
        if self.enable_prefix_caching:
            for n in range(covered + 1, new_covered + 1):
                if n % self.block_size == 0:
                    self._register_filled(seq, n)
