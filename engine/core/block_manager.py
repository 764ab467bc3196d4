"""Paged KV-cache block manager with automatic prefix caching.

Plain Python, no torch: it only hands out block *ids*; the model runner owns
the KV tensors and turns block tables into slot ids.

Model
-----
The cache is a pool of ``num_blocks`` blocks of ``block_size`` token slots
(``BlockPool``, engine/core/block_pool.py: free / evictable / referenced blocks and
the prefix cache's hash table). Block ``b`` holds the K/V of positions
``[i * bs, (i + 1) * bs)`` of every sequence whose ``block_table[i] == b``; slot
``b * bs + p % bs`` holds position ``p``. This manager keeps, per live sequence,
how many of its tokens have KV slots ("covered") and its pending draft slots, and
offers allocate, append, free, fork, extend and draft slots over the pool.

Prefix caching
--------------
A FULL block at index ``i`` of a sequence is identified by a chained digest
``H(digest of block i-1, token ids of block i)`` (128-bit BLAKE2b; block 0
chains on a fixed seed).  The block stores its digest, its parent's digest and
its token ids; a lookup hit additionally compares the stored token ids with
the sequence's, so a digest collision on the block's own tokens can never
produce a wrong hit.  (The *prefix* before the block is identified through the
chained digest only; a false hit there would need a BLAKE2b-128 collision.)

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

from engine.core.block_pool import ROOT_HASH, BlockPool, NoFreeBlocksError, compute_block_hash
from engine.core.sequence import Sequence

__all__ = ["BlockManager", "NoFreeBlocksError", "compute_block_hash"]


class BlockManager:
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
        self.pool = BlockPool(num_blocks, block_size, self.enable_prefix_caching)
        # Live sequences (holding blocks): seq_id -> Sequence, and the number
        # of tokens their block table was last sized for.
        self._seqs: dict[int, Sequence] = {}
        self._num_tokens: dict[int, int] = {}
        self._drafts: dict[int, int] = {}          # seq_id -> draft slots reserved (see reserve_drafts)
        # Prefix-cache counters (blocks), updated by allocate only.
        self._queries = 0
        self._hits = 0
        # Sequences may hold tokens pending on the device (async scheduling, which sets
        # this): the decode fast path then counts them; off, it skips the attribute.
        self.counts_pending = False
        self._hit_tokens = 0
        self._query_tokens = 0

    # ------------------------------------------------------------------ basics
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: truly free + evictable cached."""
        return self.pool.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks covering ``num_tokens`` tokens (ceil division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return (num_tokens + self.block_size - 1) // self.block_size

    def ref_count(self, block_id: int) -> int:
        """Number of live sequences whose block table contains ``block_id``."""
        return self.pool.ref_count(block_id)

    def num_covered(self, seq: Sequence) -> int:
        """Leading tokens of ``seq`` with KV slots (0 when it holds no blocks)."""
        return self._num_tokens.get(seq.seq_id, 0)

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` is registered in the prefix-cache hash table."""
        return self.pool.is_cached(block_id)

    # --------------------------------------------------------------- internals
    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(seq.token_ids[i * bs:(i + 1) * bs])

    def _full_block_hashes(self, seq: Sequence) -> list[int]:
        """Chained digests of every FULL block of ``seq`` (prefix caching only)."""
        hashes = []
        prev = ROOT_HASH
        for i in range(len(seq) // self.block_size):
            prev = compute_block_hash(prev, self._block_tokens(seq, i))
            hashes.append(prev)
        return hashes

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
                b = self.pool.lookup(hashes[i], self._block_tokens(seq, i))
                if b is None:
                    break
                hits.append(b)
        return hashes, hits, self.blocks_needed(n) - len(hits)

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
        revived = self.pool.revived_by(hits)
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
        revived = self.pool.revived_by(hits)
        if new > self.num_free_blocks - revived:
            raise NoFreeBlocksError(
                f"allocate {seq!r}: need {new} new blocks, {self.num_free_blocks - revived} available")
        # Revive/share hits first so that taking new blocks cannot evict them.
        for b in hits:
            self.pool.acquire(b)
        table = list(hits)
        for _ in range(new):
            table.append(self.pool.take())
        if self.enable_prefix_caching:
            for i in range(len(hits), len(hashes)):
                prev = hashes[i - 1] if i > 0 else ROOT_HASH
                self.pool.set_full(table[i], hashes[i], prev, self._block_tokens(seq, i))
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
            seq.block_table.append(self.pool.take())
        n = len(seq)
        self._num_tokens[seq.seq_id] = n
        if self.enable_prefix_caching and n % self.block_size == 0:
            self._register_filled(seq, n)

    def can_append_slots(self, seqs: list[Sequence]) -> bool:
        """Whether ``append_slots(seqs)`` would succeed now (the pool has a block for every
        sequence whose new position starts one), without changing anything."""
        bs = self.block_size
        need = sum(1 for seq in seqs if len(seq.token_ids) + seq.num_pending > len(seq.block_table) * bs)
        return need <= self.num_free_blocks

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
        pending = self.counts_pending
        for seq in seqs:
            n = len(seq.token_ids) + seq.num_pending if pending else len(seq.token_ids)
            if live.get(seq.seq_id) is not seq or n != covered[seq.seq_id] + 1:
                self._needs_new_block(seq)           # raises the precise error
            if n > len(seq.block_table) * bs:
                need += 1
        if need > self.num_free_blocks:
            return False
        caching = self.enable_prefix_caching
        for seq in seqs:
            n = len(seq.token_ids) + seq.num_pending if pending else len(seq.token_ids)
            table = seq.block_table
            if n > len(table) * bs:
                table.append(self.pool.take())
            covered[seq.seq_id] = n
            if caching and n % bs == 0:
                self._register_filled(seq, n)
        return True

    def _register_filled(self, seq: Sequence, n: int) -> None:
        """Registers the block that position ``n - 1`` just filled (prefix caching); one
        whose last token is still pending on the device waits for ``register_resolved``."""
        if n <= len(seq.token_ids):
            self.pool.register_filled(seq.block_table, seq.token_ids, n // self.block_size - 1)

    def register_resolved(self, seq: Sequence) -> None:
        """``seq``'s oldest pending token was just read back (appended to ``token_ids``):
        registers the block it filled, which ``append_slot`` could not hash without it."""
        n = len(seq.token_ids)
        if (self.enable_prefix_caching and n % self.block_size == 0 and self._seqs.get(seq.seq_id) is seq
                and self._num_tokens[seq.seq_id] > n - 1 >= 0):
            self.pool.register_filled(seq.block_table, seq.token_ids, n // self.block_size - 1)

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
            self.pool.release(b)
        # A new list, not clear(): the runner's persistent decode inputs tell a
        # re-allocated table from a grown one by the list's identity.
        seq.block_table = []
        seq.num_cached_tokens = 0
        del self._seqs[seq.seq_id]
        del self._num_tokens[seq.seq_id]

    # ------------------------------------------------------------------- fork / extend
    # fork: a child shares every full covered block of the parent (copy-on-write: a running
    # sequence's partial last block is private, copied); extend: a held sequence grows by many
    # tokens at once, sharing prefix-cache blocks of the new text.
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
        FULL covered block of the parent (one more reference) and gets a private copy of
        the last PARTIAL covered block, if any. Returns the ``(src_block, dst_block)``
        copies the runner must perform on the KV tensors before the next forward pass
        (empty when the covered tokens end on a block boundary). Sets
        ``child.num_cached_tokens`` to the covered count. Raises ``NoFreeBlocksError``
        (state unchanged) when no block is free for the copy.
        """
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
            raise NoFreeBlocksError(f"fork {parent!r}: no free block for the partial-block copy")
        table = list(parent.block_table[:n_full])
        for b in table:
            self.pool.acquire(b)
        copies: list[tuple[int, int]] = []
        if partial:
            dst = self.pool.take()
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
        bs, n = self.block_size, len(seq)
        table, covered = seq.block_table, self._num_tokens[seq.seq_id]
        first = covered // bs
        hits: list[int] = []
        if self.enable_prefix_caching:
            prev = ROOT_HASH if first == 0 else self.pool.digest(table[first - 1])
            cap = (n - 1) // bs
            if max_hit_tokens is not None:
                cap = min(cap, max_hit_tokens // bs)
            for i in range(first, cap):
                if prev is None:
                    break
                tokens = self._block_tokens(seq, i)
                h = compute_block_hash(prev, tokens)
                b = self.pool.lookup(h, tokens)
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
        revived = self.pool.revived_by(hits)
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
        self._check_live(seq, "extend")
        hits, new, drop = self._plan_extension(seq, max_hit_tokens)
        revived = self.pool.revived_by(hits)
        if new > self.num_free_blocks - revived + int(drop):
            raise NoFreeBlocksError(f"extend {seq!r}: need {new} new blocks, "
                                    f"{self.num_free_blocks} available")
        table, bs = seq.block_table, self.block_size
        covered = self._num_tokens[seq.seq_id]
        first = covered // bs
        for b in hits:                       # revive/share first, so taking cannot evict them
            self.pool.acquire(b)
        if drop:
            self.pool.release(table.pop(first))
        table.extend(hits)
        for _ in range(new):
            table.append(self.pool.take())
        cached = max(covered, (first + len(hits)) * bs) if hits else covered
        self._num_tokens[seq.seq_id] = len(seq)
        if self.enable_prefix_caching:
            self._hits += len(hits)
            self._hit_tokens += max(0, cached - covered)
            for n in range(cached + 1, len(seq) + 1):
                if n % bs == 0:
                    self._register_filled(seq, n)
        seq.num_cached_tokens = cached

    # ------------------------------------------------------------------- draft slots
    # KV slots for speculative drafts: reserved for one verify step, then kept for the
    # accepted tokens and rolled back for the rejected ones.
    #
    # A verify step computes, for a running sequence, its last token (slot given by
    # ``append_slot`` as in any decode step) and k drafted tokens after it. Their slots are
    # positions ``[len, len + k)``:
    #
    # * ``reserve_drafts(seq, k)`` gives the sequence blocks up to position ``len + k - 1``.
    #   Every draft position lies in the sequence's private last block or in a new block: a
    #   running sequence's partial last block is never shared (forks copy it, the prefix
    #   cache only shares full blocks), so writing drafts never touches a block another
    #   sequence holds. A block filled by draft tokens is NOT registered in the prefix cache:
    #   no other request can hit tokens that may be rejected.
    # * ``settle_drafts(seq, accepted)``, after the caller appended the accepted drafts and
    #   the bonus token to ``seq.token_ids``: the accepted positions become covered (their KV
    #   is the right one), the blocks they fill are registered, and the blocks reserved only
    #   for rejected drafts go back to the pool (a freed draft block was private and never
    #   registered). The bonus token gets its slot from the next ``append_slot``, as a
    #   sampled token does. Rejected drafts' KV left in a kept block is stale past the
    #   sequence's length, where attention never reads, and is overwritten when the real
    #   tokens of those positions are computed.
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
        if k < 1:
            raise ValueError(f"reserve_drafts: k={k} must be >= 1")
        need = self._draft_blocks(seq, k)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"reserve_drafts {seq!r}: need {need} blocks, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self.pool.take())
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
                self.pool.release(b)
            # a new list: the decode inputs tell a shrunk table from a grown one by identity
            seq.block_table = seq.block_table[:keep]
        if self.enable_prefix_caching:
            for n in range(covered + 1, new_covered + 1):
                if n % self.block_size == 0:
                    self._register_filled(seq, n)

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
        return self.pool.reset_prefix_cache()

    def get_stats(self) -> dict:
        """Pool occupancy and prefix-cache counters.

        ``free``: truly free blocks; ``cached_evictable``: unreferenced cached
        blocks; ``used``: referenced blocks (the three sum to ``num_blocks``);
        ``cached``: entries in the hash table (evictable + referenced).
        ``prefix_cache_queries``/``prefix_cache_hits`` count blocks eligible
        for reuse / reused across ``allocate`` calls (token counterparts in
        ``*_tokens``); ``prefix_cache_hit_rate`` = hits / queries (0 if none).
        """
        return {
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            **self.pool.counts(),
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
        refs = [0] * self.num_blocks
        for sid, seq in self._seqs.items():
            assert seq.seq_id == sid
            table = seq.block_table
            assert len(table) == self.blocks_needed(self._num_tokens[sid] + self._drafts.get(sid, 0)), (
                seq, self._num_tokens[sid])
            assert self._num_tokens[sid] <= len(seq)
            assert len(set(table)) == len(table), f"block twice in table of {seq!r}"
            prev = ROOT_HASH
            for i, b in enumerate(table):
                refs[b] += 1
                prev = self.pool.check_table_entry(b, i, seq.token_ids, prev)
        self.pool.check_invariants(refs)
