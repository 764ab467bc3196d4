"""The KV-cache block pool: which blocks are free, which hold reusable prefix-cache content,
and how many sequences reference each. Plain Python, no torch, and nothing about
sequences: ``BlockManager`` (engine/core/block_manager.py) decides which blocks a sequence
holds and asks the pool for them.

Every block is in exactly one of three states:

* **free**       -- ref count 0, holds nothing useful (``_free`` deque);
* **evictable**  -- ref count 0 but registered in the prefix-cache hash table, so a later
  sequence with the same prefix can revive it (``_evictable``, an LRU ordered by the time
  the block was freed, oldest first);
* **referenced** -- ref count > 0: in the block table of at least one live sequence.

A FULL block is identified by a chained digest ``H(digest of the previous block, token
ids of this block)`` (128-bit BLAKE2b; block 0 chains on ``ROOT_HASH``). The block stores
its digest, its parent's digest and its token ids; a lookup hit additionally compares the
stored token ids, so a digest collision on the block's own tokens can never produce a
wrong hit. A block is *registered* iff ``_hash_to_block[block.hash] == block.block_id``;
a full block whose twin was registered first carries its digest but stays private and
goes to the free list, not the evictable set, when released.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Iterable, Sequence

ROOT_HASH = 0          # the digest block 0 of every sequence chains on


class NoFreeBlocksError(RuntimeError):
    """The pool does not have enough free (or evictable) blocks for a request.

    Raised by ``BlockManager.allocate``, ``append_slot``, ``fork``, ``extend`` and
    ``reserve_drafts`` when the matching ``can_*`` check is False. The state is unchanged
    when it is raised, so the scheduler may preempt something and retry.
    """


def compute_block_hash(prev_hash: int, token_ids: Iterable[int]) -> int:
    """Chained 128-bit digest of one full block: ``H(prev_hash, token_ids)``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev_hash.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


class _Block:
    __slots__ = ("block_id", "ref_count", "hash", "prev_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        # Set only for FULL blocks when prefix caching is on.
        self.hash: int | None = None
        self.prev_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None

    def clear_content(self) -> None:
        self.hash = None
        self.prev_hash = None
        self.token_ids = None

    def __repr__(self) -> str:
        return f"_Block(id={self.block_id}, ref={self.ref_count}, hashed={self.hash is not None})"


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` token slots, with the prefix cache's hash
    table when ``enable_prefix_caching``."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Handed out from the right, low ids first; a freed block goes back on the right,
        # so it is the next one reused (LIFO): the pool's touched memory stays what is in
        # use (the CPU pool commits pages only when first written).
        self._free: deque[int] = deque(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest-freed first
        self._hash_to_block: dict[int, int] = {}

    # ---- reading -----------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now: truly free + evictable cached."""
        return len(self._free) + len(self._evictable)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def digest(self, block_id: int) -> int | None:
        """The block's chained digest (None unless it is a hashed full block)."""
        return self._blocks[block_id].hash

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` is registered in the prefix-cache hash table."""
        blk = self._blocks[block_id]
        return blk.hash is not None and self._hash_to_block.get(blk.hash) == block_id

    def lookup(self, h: int, tokens: tuple[int, ...]) -> int | None:
        """The registered block with digest ``h`` holding exactly ``tokens``, or None."""
        b = self._hash_to_block.get(h)
        if b is None or self._blocks[b].token_ids != tokens:
            return None
        return b

    def revived_by(self, hits: Iterable[int]) -> int:
        """How many of the hit blocks are evictable (taking them shrinks the pool)."""
        return sum(1 for b in hits if self._blocks[b].ref_count == 0)

    # ---- handing out and taking back ----------------------------------------------
    def take(self) -> int:
        """A truly free block, else the least recently freed cached one (evicted)."""
        if self._free:
            b = self._free.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            blk = self._blocks[b]
            del self._hash_to_block[blk.hash]
            blk.clear_content()
        else:  # callers check availability first
            raise NoFreeBlocksError("no free KV-cache block")
        blk = self._blocks[b]
        assert blk.ref_count == 0 and blk.hash is None
        blk.ref_count = 1
        return b

    def acquire(self, b: int) -> None:
        """One more reference to a cache hit or a shared block (reviving an evictable one)."""
        blk = self._blocks[b]
        if blk.ref_count == 0:
            del self._evictable[b]
        blk.ref_count += 1

    def release(self, b: int) -> None:
        """One reference less; at 0 the block becomes evictable if registered, else free."""
        blk = self._blocks[b]
        if blk.ref_count <= 0:
            raise AssertionError(f"double free of block {b}")
        blk.ref_count -= 1
        if blk.ref_count == 0:
            if self.is_cached(b):
                self._evictable[b] = None  # most recently freed -> evicted last
            else:
                blk.clear_content()
                self._free.append(b)

    # ---- the prefix cache ----------------------------------------------------------
    def set_full(self, b: int, h: int, prev_hash: int, tokens: tuple[int, ...]) -> None:
        """Record a full block's identity; register it unless a twin already is."""
        blk = self._blocks[b]
        blk.hash, blk.prev_hash, blk.token_ids = h, prev_hash, tokens
        if h not in self._hash_to_block:
            self._hash_to_block[h] = b

    def register_filled(self, table: Sequence[int], token_ids: Sequence[int], i: int) -> None:
        """Registers block ``table[i]``, just filled with ``token_ids[i*bs:(i+1)*bs]``,
        chained on the digest of ``table[i - 1]`` (no-op if it already has a digest)."""
        b = table[i]
        if self._blocks[b].hash is None:
            prev = self._blocks[table[i - 1]].hash if i > 0 else ROOT_HASH
            assert prev is not None, "previous full block has no digest"
            bs = self.block_size
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            self.set_full(b, compute_block_hash(prev, tokens), prev, tokens)

    def reset_prefix_cache(self) -> int:
        """Moves every evictable cached block to the free list (dropping its hash entry);
        blocks still referenced stay registered. Returns the number dropped."""
        dropped = 0
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            blk = self._blocks[b]
            del self._hash_to_block[blk.hash]
            blk.clear_content()
            self._free.append(b)
            dropped += 1
        return dropped

    def counts(self) -> dict:
        """``free``, ``cached_evictable``, ``used`` (referenced; the three sum to
        ``num_blocks``) and ``cached`` (hash-table entries)."""
        free, evict = len(self._free), len(self._evictable)
        return {"free": free, "cached_evictable": evict, "used": self.num_blocks - free - evict,
                "cached": len(self._hash_to_block)}

    # ---- consistency ---------------------------------------------------------------
    def check_invariants(self, refs: list[int]) -> None:
        """Asserts the pool's consistency given ``refs[b]``, the number of live block-table
        entries naming each block (counted by the manager)."""
        bs = self.block_size
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "block twice in the free list"
        evict_set = set(self._evictable)
        assert not (free_set & evict_set), "block both free and evictable"
        for blk in self._blocks:
            b = blk.block_id
            assert blk.ref_count >= 0
            assert blk.ref_count == refs[b], f"block {b}: ref {blk.ref_count} != {refs[b]} references"
            states = (b in free_set) + (b in evict_set) + (blk.ref_count > 0)
            assert states == 1, f"block {b} is in {states} states"
            if b in free_set:
                assert blk.hash is None and blk.token_ids is None
            if b in evict_set:
                assert self.is_cached(b), f"evictable block {b} is not registered"
            if blk.hash is not None:
                assert self.enable_prefix_caching
                assert blk.token_ids is not None and len(blk.token_ids) == bs
                assert compute_block_hash(blk.prev_hash, blk.token_ids) == blk.hash
        for h, b in self._hash_to_block.items():
            assert self._blocks[b].hash == h, f"hash entry -> block {b} with another digest"
        if not self.enable_prefix_caching:
            assert not self._hash_to_block and not self._evictable

    def check_table_entry(self, b: int, i: int, seq_tokens: Sequence[int], prev: int | None) -> int | None:
        """Asserts that block ``b`` at index ``i`` of a live table is consistent with the
        sequence's tokens (a hashed block stores exactly them and chains on ``prev``).
        Returns the digest the next block chains on (None: later blocks are unhashed)."""
        blk = self._blocks[b]
        if blk.hash is None:
            return None
        bs = self.block_size
        assert (i + 1) * bs <= len(seq_tokens)
        assert blk.token_ids == tuple(seq_tokens[i * bs:(i + 1) * bs]), (i, b)
        assert blk.prev_hash == prev, (i, b)
        return blk.hash
