"""Paged KV-cache block manager with automatic prefix caching.

Plain Python, no torch: it only hands out block *ids*; the model runner owns
the KV tensors and turns block tables into slot ids.

Model
-----
The cache is a pool of ``num_blocks`` blocks of ``block_size`` token slots.
Block ``b`` holds the K/V of positions ``[i * bs, (i + 1) * bs)`` of every
sequence whose ``block_table[i] == b``; slot ``b * bs + p % bs`` holds position
``p``.  Every block is in exactly one of three states:

* **free**       -- ref count 0, holds nothing useful (``_free`` deque);
* **evictable**  -- ref count 0 but registered in the prefix-cache hash table,
  so a later sequence with the same prefix can revive it (``_evictable``, an
  LRU ordered by the time the block was freed, oldest first);
* **referenced** -- ref count > 0: in the block table of at least one live
  sequence.

Prefix caching
--------------
A FULL block at index ``i`` of a sequence is identified by a chained digest
``H(digest of block i-1, token ids of block i)`` (128-bit BLAKE2b; block 0
chains on a fixed seed).  The block stores its digest, its parent's digest and
its token ids; a lookup hit additionally compares the stored token ids with
the sequence's, so a digest collision on the block's own tokens can never
produce a wrong hit.  (The *prefix* before the block is identified through the
chained digest only; a false hit there would need a BLAKE2b-128 collision.)

A block is *registered* iff ``_hash_to_block[block.hash] == block.block_id``.
A full block may carry a digest without being registered (when an identical
block was already registered, the newcomer is a duplicate and stays private);
such a block goes to the free list, not the evictable set, when released.

Contract with the scheduler / model runner (see also each method)
-----------------------------------------------------------------
* Blocks are registered in the hash table as soon as they are *scheduled* to
  be filled: at ``allocate`` (every full block not reused from the cache) and
  at ``append_slot`` (the block that the appended token fills up).  The K/V
  of those blocks is written by the forward pass of the SAME step.  Hence:

  - another sequence allocated in the same step may hit those blocks; the
    runner must write the KV of all sequences of a layer (``store_kvcache``)
    before running attention for that layer, which a paged-attention runner
    does naturally;
  - a sequence must not be ``free``d between the ``allocate`` /
    ``append_slot`` that scheduled it and the forward pass that computes its
    KV (apply aborts at step boundaries).  Otherwise blocks whose KV was never
    written stay in the cache and later hits read garbage.
  - prefill is not chunked: ``allocate`` assumes positions
    ``[num_cached_tokens, len(seq))`` are all computed in that step.
* ``append_slot`` must be called exactly once per appended token, after
  ``seq.token_ids`` grew by one and before the decode step that writes that
  token's KV (position ``len(seq) - 1``).
* ``fork`` must be called between steps, while the parent's KV covers all its
  tokens or all but the last one (appended, its slot not yet given); the
  returned copies must be executed before the next forward pass.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Iterable

from engine.core.block_fork_extend import ForkExtendMixin
from engine.core.draft_slots import DraftSlotsMixin
from engine.core.sequence import Sequence

__all__ = ["BlockManager", "NoFreeBlocksError", "compute_block_hash"]

# Digest that block 0 of every sequence chains on.
_ROOT_HASH = 0


class NoFreeBlocksError(RuntimeError):
    """The pool does not have enough free (or evictable) blocks for a request.

    Raised by ``allocate``, ``append_slot`` and ``fork`` when the matching
    ``can_*`` check is False.  The manager's state is unchanged when it is
    raised, so the scheduler may preempt something and retry.
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


class BlockManager(ForkExtendMixin, DraftSlotsMixin):
    """Allocates KV-cache blocks to sequences, with optional prefix caching.

    Args:
        num_blocks: size of the pool (>= 1).
        block_size: tokens per block (>= 1).
        enable_prefix_caching: share identical full prompt/prefix blocks
            between sequences and keep freed full blocks around (evictable)
            for later reuse.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Handed out from the right, low ids first; a freed block goes back on the right,
        # so it is the next one reused (LIFO): the pool's touched memory stays what is in
        # use (the CPU pool commits pages only when first written).
        self._free: deque[int] = deque(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest-freed first
        self._hash_to_block: dict[int, int] = {}
        # Live sequences (holding blocks): seq_id -> Sequence, and the number
        # of tokens their block table was last sized for.
        self._seqs: dict[int, Sequence] = {}
        self._num_tokens: dict[int, int] = {}
        self._drafts: dict[int, int] = {}          # seq_id -> draft slots reserved (engine/core/draft_slots.py)
        # Prefix-cache counters (blocks), updated by allocate only.
        self._queries = 0
        self._hits = 0
        self._hit_tokens = 0
        self._query_tokens = 0

    # ------------------------------------------------------------------ basics
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: truly free + evictable cached."""
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks covering ``num_tokens`` tokens (ceil division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return (num_tokens + self.block_size - 1) // self.block_size

    def ref_count(self, block_id: int) -> int:
        """Number of live sequences whose block table contains ``block_id``."""
        return self._blocks[block_id].ref_count

    def num_covered(self, seq: Sequence) -> int:
        """Leading tokens of ``seq`` with KV slots (0 when it holds no blocks)."""
        return self._num_tokens.get(seq.seq_id, 0)

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` is registered in the prefix-cache hash table."""
        blk = self._blocks[block_id]
        return blk.hash is not None and self._hash_to_block.get(blk.hash) == block_id

    # --------------------------------------------------------------- internals
    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(seq.token_ids[i * bs:(i + 1) * bs])

    def _full_block_hashes(self, seq: Sequence) -> list[int]:
        """Chained digests of every FULL block of ``seq`` (prefix caching only)."""
        hashes = []
        prev = _ROOT_HASH
        for i in range(len(seq) // self.block_size):
            prev = compute_block_hash(prev, self._block_tokens(seq, i))
            hashes.append(prev)
        return hashes

    def _lookup(self, h: int, tokens: tuple[int, ...]) -> int | None:
        """Registered block with digest ``h`` holding exactly ``tokens``, or None."""
        b = self._hash_to_block.get(h)
        if b is None or self._blocks[b].token_ids != tokens:
            return None
        return b

    def _plan_allocation(self, seq: Sequence, max_hit_tokens: int | None = None
                         ) -> tuple[list[int], list[int], int]:
        """(full-block digests, cache-hit block ids, blocks to take from the pool)."""
        if seq.block_table:
            raise ValueError(f"allocate: {seq!r} already has a block table")
        if seq.seq_id in self._seqs:
            raise ValueError(f"allocate: seq_id {seq.seq_id} already holds blocks")
        n = len(seq)
        if n == 0:
            raise ValueError("allocate: sequence has no tokens")
        hashes: list[int] = []
        hits: list[int] = []
        if self.enable_prefix_caching:
            hashes = self._full_block_hashes(seq)
            # Never reuse the block holding the last token: the model has to
            # compute at least one position to produce logits.
            cap = (n - 1) // self.block_size
            if max_hit_tokens is not None:  # positions the caller needs computed (their logits)
                cap = min(cap, max_hit_tokens // self.block_size)
            for i in range(cap):
                b = self._lookup(hashes[i], self._block_tokens(seq, i))
                if b is None:
                    break
                hits.append(b)
        return hashes, hits, self.blocks_needed(n) - len(hits)

    def _take_block(self) -> int:
        """Take a truly free block, else evict the least recently freed cached one."""
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

    def _acquire_cached(self, b: int) -> None:
        blk = self._blocks[b]
        if blk.ref_count == 0:
            del self._evictable[b]  # revive
        blk.ref_count += 1

    def _set_full(self, b: int, h: int, prev_hash: int, tokens: tuple[int, ...]) -> None:
        """Record a full block's identity; register it unless a twin already is."""
        blk = self._blocks[b]
        blk.hash, blk.prev_hash, blk.token_ids = h, prev_hash, tokens
        if h not in self._hash_to_block:
            self._hash_to_block[h] = b

    def _release(self, b: int) -> None:
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

    def _check_live(self, seq: Sequence, what: str) -> None:
        if self._seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"{what}: {seq!r} holds no blocks of this manager (allocate it first)")

    # --------------------------------------------------------------- allocate
    def can_allocate(self, seq: Sequence, max_hit_tokens: int | None = None) -> bool:
        """Whether ``allocate(seq)`` would succeed now.

        Counts prefix-cache hits: a hit on a referenced block is free, a hit on
        an evictable block removes it from the pool that new blocks come from.
        Raises ValueError if ``seq`` already holds blocks or has no tokens.
        """
        _, hits, new = self._plan_allocation(seq, max_hit_tokens)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        return new <= self.num_free_blocks - revived

    def allocate(self, seq: Sequence, max_hit_tokens: int | None = None) -> None:
        """Give ``seq`` (empty block table) blocks covering ``len(seq)`` tokens.

        With prefix caching, leading full blocks found in the cache are shared
        (at most ``(len(seq) - 1) // block_size`` of them; reuse stops at the
        first miss) and ``seq.num_cached_tokens`` is set to the tokens they
        cover; the caller must compute positions ``[num_cached_tokens,
        len(seq))`` in this step.  Newly allocated full blocks are registered
        in the hash table right away.  ``max_hit_tokens``: reuse at most that many
        leading tokens (the caller needs the later positions computed).  Raises
        ``NoFreeBlocksError`` (state unchanged) when ``can_allocate(seq)`` is False.
        """
        hashes, hits, new = self._plan_allocation(seq, max_hit_tokens)
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        if new > self.num_free_blocks - revived:
            raise NoFreeBlocksError(
                f"allocate {seq!r}: need {new} new blocks, {self.num_free_blocks - revived} available")
        # Revive/share hits first so that taking new blocks cannot evict them.
        for b in hits:
            self._acquire_cached(b)
        table = list(hits)
        for _ in range(new):
            table.append(self._take_block())
        if self.enable_prefix_caching:
            for i in range(len(hits), len(hashes)):
                prev = hashes[i - 1] if i > 0 else _ROOT_HASH
                self._set_full(table[i], hashes[i], prev, self._block_tokens(seq, i))
            self._queries += (len(seq) - 1) // self.block_size
            self._hits += len(hits)
            self._query_tokens += len(seq)
            self._hit_tokens += len(hits) * self.block_size
        seq.block_table.extend(table)
        seq.num_cached_tokens = len(hits) * self.block_size
        self._seqs[seq.seq_id] = seq
        self._num_tokens[seq.seq_id] = len(seq)

    # ----------------------------------------------------------------- append
    def _needs_new_block(self, seq: Sequence) -> bool:
        self._check_live(seq, "append_slot")
        if len(seq) != self._num_tokens[seq.seq_id] + 1:
            raise ValueError(
                f"append_slot: {seq!r} has {len(seq)} tokens, block table covers "
                f"{self._num_tokens[seq.seq_id]}; call append_slot once per appended token")
        return len(seq.block_table) < self.blocks_needed(len(seq))

    def can_append(self, seq: Sequence) -> bool:
        """Whether ``append_slot(seq)`` would succeed (needs 1 block iff the
        newly appended position ``len(seq) - 1`` starts a new block)."""
        return not self._needs_new_block(seq) or self.num_free_blocks >= 1

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the KV of position ``len(seq) - 1``.

        Call exactly once after each ``seq.append_token`` and before the decode
        step that writes that token's KV.  Allocates a block when the position
        starts a new block (``NoFreeBlocksError``, state unchanged, if none is
        available).  When the position fills its block (``len(seq) % bs == 0``)
        and prefix caching is on, the block is registered in the hash table
        (chained on the previous block's digest).
        """
        if self._needs_new_block(seq):
            if self.num_free_blocks < 1:
                raise NoFreeBlocksError(f"append_slot {seq!r}: no free block")
            seq.block_table.append(self._take_block())
        n = len(seq)
        self._num_tokens[seq.seq_id] = n
        if self.enable_prefix_caching and n % self.block_size == 0:
            self._register_filled(seq, n)

    def append_slots(self, seqs: list[Sequence]) -> bool:
        """``append_slot`` for every sequence of a decode step at once, or nothing.

        The decode step's fast path: one pass counts the sequences whose new
        position starts a block; if the pool cannot give them all one, returns
        False with nothing changed (the scheduler then goes sequence by sequence
        and preempts). Else appends every slot, as ``append_slot`` would, and
        returns True. Same checks (live, exactly one new token each).
        """
        bs = self.block_size
        live, covered = self._seqs, self._num_tokens
        need = 0
        for seq in seqs:
            n = len(seq.token_ids)
            if live.get(seq.seq_id) is not seq or n != covered[seq.seq_id] + 1:
                self._needs_new_block(seq)           # raises the precise error
            if n > len(seq.block_table) * bs:
                need += 1
        if need > self.num_free_blocks:
            return False
        caching = self.enable_prefix_caching
        for seq in seqs:
            n = len(seq.token_ids)
            table = seq.block_table
            if n > len(table) * bs:
                table.append(self._take_block())
            covered[seq.seq_id] = n
            if caching and n % bs == 0:
                self._register_filled(seq, n)
        return True

    def _register_filled(self, seq: Sequence, n: int) -> None:
        """Registers the block that position ``n - 1`` just filled (prefix caching)."""
        i = n // self.block_size - 1
        b = seq.block_table[i]
        if self._blocks[b].hash is None:
            prev = self._blocks[seq.block_table[i - 1]].hash if i > 0 else _ROOT_HASH
            assert prev is not None, "previous full block has no digest"
            tokens = self._block_tokens(seq, i)
            self._set_full(b, compute_block_hash(prev, tokens), prev, tokens)

    # ------------------------------------------------------------------- free
    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks, give it a new empty table, reset num_cached_tokens.

        A block whose ref count drops to 0 becomes evictable if it is
        registered in the prefix cache, else truly free.  Blocks are released
        last-to-first, so a sequence's tail blocks are evicted before its
        prefix.  No-op for a sequence with an empty table (double abort).
        """
        if not seq.block_table:
            seq.num_cached_tokens = 0
            if self._seqs.get(seq.seq_id) is seq:  # cannot happen (len >= 1), be safe
                del self._seqs[seq.seq_id]
                del self._num_tokens[seq.seq_id]
            return
        self._check_live(seq, "free")
        self._drafts.pop(seq.seq_id, None)
        for b in reversed(seq.block_table):
            self._release(b)
        # A new list, not clear(): the runner's persistent decode inputs tell a
        # re-allocated table from a grown one by the list's identity.
        seq.block_table = []
        seq.num_cached_tokens = 0
        del self._seqs[seq.seq_id]
        del self._num_tokens[seq.seq_id]

    # ------------------------------------------------------------------ misc
    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slot ids of positions ``[start, end)`` of ``seq``."""
        bs = self.block_size
        table = seq.block_table
        if start < 0 or end < start or self.blocks_needed(end) > len(table):
            raise ValueError(f"slot_mapping: positions [{start}, {end}) not covered by {table}")
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def reset_prefix_cache(self) -> int:
        """Move every evictable cached block to the free list (dropping its
        hash entry).  Blocks still referenced stay registered.  Returns the
        number of blocks dropped."""
        dropped = 0
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            blk = self._blocks[b]
            del self._hash_to_block[blk.hash]
            blk.clear_content()
            self._free.append(b)
            dropped += 1
        return dropped

    def get_stats(self) -> dict:
        """Pool occupancy and prefix-cache counters.

        ``free``: truly free blocks; ``cached_evictable``: unreferenced cached
        blocks; ``used``: referenced blocks (the three sum to ``num_blocks``);
        ``cached``: entries in the hash table (evictable + referenced).
        ``prefix_cache_queries``/``prefix_cache_hits`` count blocks eligible
        for reuse / reused across ``allocate`` calls (token counterparts in
        ``*_tokens``); ``prefix_cache_hit_rate`` = hits / queries (0 if none).
        """
        free, evict = len(self._free), len(self._evictable)
        return {
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "free": free,
            "cached_evictable": evict,
            "used": self.num_blocks - free - evict,
            "cached": len(self._hash_to_block),
            "num_seqs": len(self._seqs),
            "prefix_cache_queries": self._queries,
            "prefix_cache_hits": self._hits,
            "prefix_cache_query_tokens": self._query_tokens,
            "prefix_cache_hit_tokens": self._hit_tokens,
            "prefix_cache_hit_rate": self._hits / self._queries if self._queries else 0.0,
        }

    def check_invariants(self) -> None:
        """Assert internal consistency (O(blocks + tokens of live seqs)).

        * every block is in exactly one of free / evictable / referenced;
        * free blocks carry no content; evictable blocks are registered;
        * each ref count equals the number of live-sequence table entries
          naming the block, and no table names a block twice;
        * each live table has ``blocks_needed(tokens covered)`` entries;
        * every hash-table entry points to a full block whose stored digest
          is ``H(stored prev digest, stored tokens)``;
        * every full block with a digest in a live table stores exactly that
          sequence's tokens and chains on the digest of the previous block.
        """
        bs = self.block_size
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "block twice in the free list"
        evict_set = set(self._evictable)
        assert not (free_set & evict_set), "block both free and evictable"
        refs = [0] * self.num_blocks
        for sid, seq in self._seqs.items():
            assert seq.seq_id == sid
            table = seq.block_table
            assert len(table) == self.blocks_needed(self._num_tokens[sid] + self._drafts.get(sid, 0)), (
                seq, self._num_tokens[sid])
            assert self._num_tokens[sid] <= len(seq)
            assert len(set(table)) == len(table), f"block twice in table of {seq!r}"
            prev = _ROOT_HASH
            for i, b in enumerate(table):
                refs[b] += 1
                blk = self._blocks[b]
                if blk.hash is not None:
                    assert (i + 1) * bs <= len(seq)
                    assert blk.token_ids == self._block_tokens(seq, i), (seq, i, b)
                    assert blk.prev_hash == prev, (seq, i, b)
                    prev = blk.hash
                else:
                    prev = None  # later blocks cannot be hashed without a parent
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
