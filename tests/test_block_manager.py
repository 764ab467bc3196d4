"""Tests for engine.core.block_manager: hand-computed unit tests + a stateful model.

The stateful test keeps a SIMULATED KV cache and plays the model runner:
whatever the manager says is cached must really hold the right data, and
nobody may write through a block somebody else still reads.  Real K/V at
position p depends on the token at p AND on every earlier token (attention),
so the simulated cache stores, per slot, the token id written there together
with the whole prefix it was computed from: ``slot -> tuple(token_ids[:p+1])``
(its last element is the token id).  That also catches reuse of a block whose
tokens match but whose prefix differs (a broken hash chain).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import engine.core.block_manager as bm_mod
import engine.core.block_pool as pool_mod
from engine.core.block_manager import BlockManager, NoFreeBlocksError
from engine.core.sequence import Sequence


def S(tokens):
    return Sequence(list(tokens))


def snapshot(bm: BlockManager, seqs=()):
    """Everything observable about the manager (and some seqs) for 'unchanged' checks."""
    return (
        bm.get_stats(),
        [bm.ref_count(b) for b in range(bm.num_blocks)],
        [bm.is_cached(b) for b in range(bm.num_blocks)],
        list(bm.pool._free), list(bm.pool._evictable), dict(bm.pool._hash_to_block),
        [(list(s.block_table), s.num_cached_tokens, len(s)) for s in seqs],
    )


# ----------------------------------------------------------------- unit tests
def test_constructor_validation():
    with pytest.raises(ValueError):
        BlockManager(0)
    with pytest.raises(ValueError):
        BlockManager(4, block_size=0)
    bm = BlockManager(5, 3)
    assert bm.num_free_blocks == 5
    assert bm.get_stats()["free"] == 5 and bm.get_stats()["used"] == 0
    assert NoFreeBlocksError.__mro__[1] is RuntimeError


def test_blocks_needed():
    bm = BlockManager(4, 4)
    assert [bm.blocks_needed(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_counts_and_slot_mapping():
    bm = BlockManager(10, 4)
    s = S(range(9))                      # 9 tokens -> 3 blocks
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert s.block_table == [0, 1, 2]    # free list is handed out in order
    assert s.num_cached_tokens == 0
    assert bm.num_free_blocks == 7
    st_ = bm.get_stats()
    assert (st_["free"], st_["cached_evictable"], st_["used"]) == (7, 0, 3)
    assert bm.slot_mapping(s, 2, 6) == [2, 3, 4, 5]
    s2 = S(range(100, 105))
    bm.allocate(s2)
    assert s2.block_table == [3, 4]
    assert bm.slot_mapping(s2, 3, 5) == [15, 16]
    with pytest.raises(ValueError):
        bm.slot_mapping(s2, 0, 9)        # beyond the table
    with pytest.raises(ValueError):
        bm.allocate(s2)                  # already has a table
    bm.check_invariants()


def test_prefix_hit_two_full_blocks_different_tails():
    bm = BlockManager(10, 4)
    a = S(list(range(8)) + [100, 101])   # blocks: [0..3] [4..7] [100 101]
    b = S(list(range(8)) + [200])
    bm.allocate(a)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert b.num_cached_tokens == 8
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 10 - 4
    st_ = bm.get_stats()
    # a: 2 eligible blocks, 0 hits; b: (9-1)//4 = 2 eligible, 2 hits
    assert (st_["prefix_cache_queries"], st_["prefix_cache_hits"]) == (4, 2)
    assert st_["prefix_cache_hit_rate"] == 0.5
    # A prompt diverging in block 0 gets nothing even though block 1 matches.
    c = S([9, 1, 2, 3, 4, 5, 6, 7, 1])
    bm.allocate(c)
    assert c.num_cached_tokens == 0 and not set(c.block_table) & set(a.block_table)
    bm.check_invariants()


def test_last_token_cap_exact_multiple():
    bm = BlockManager(10, 4)
    a = S(range(8))                      # exactly two full blocks
    bm.allocate(a)
    assert all(bm.is_cached(x) for x in a.block_table)
    b = S(range(8))                      # fully cached, but the last token must be computed
    bm.allocate(b)
    assert b.num_cached_tokens == 4
    assert b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]   # last block is computed into a new block
    assert bm.ref_count(a.block_table[1]) == 1
    # The duplicate is not registered; the original stays the cached one.
    assert bm.is_cached(a.block_table[1]) and not bm.is_cached(b.block_table[1])
    # One more token: both full blocks are now reusable.
    c = S(list(range(8)) + [5])
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table
    # Single-token and sub-block prompts never hit.
    d = S([0])
    bm.allocate(d)
    assert d.num_cached_tokens == 0
    bm.check_invariants()
    # Freeing b: its duplicate block is unregistered -> truly free, not evictable.
    dup = b.block_table[1]
    bm.free(b)
    assert dup in bm.pool._free and dup not in bm.pool._evictable
    bm.check_invariants()


def test_fork_with_partial_block():
    bm = BlockManager(6, 4)
    p = S(range(6))                      # [0..3] full, [4,5] partial
    bm.allocate(p)
    c = S(p.token_ids)
    assert bm.can_fork(p)
    copies = bm.fork(p, c)
    assert c.block_table[0] == p.block_table[0]
    assert c.block_table[1] not in p.block_table
    assert copies == [(p.block_table[1], c.block_table[1])]
    assert c.num_cached_tokens == 6
    assert bm.ref_count(p.block_table[0]) == 2 and bm.ref_count(p.block_table[1]) == 1
    assert bm.num_free_blocks == 3
    bm.check_invariants()
    # Child diverges: its appends land in its private copy.
    c.append_token(77)
    bm.append_slot(c)
    assert bm.slot_mapping(c, 6, 7)[0] // 4 == c.block_table[1]
    bm.check_invariants()


def test_fork_without_partial_block():
    bm = BlockManager(4, 4)
    p = S(range(8))
    bm.allocate(p)
    c = S(p.token_ids)
    assert bm.fork(p, c) == []
    assert c.block_table == p.block_table
    assert [bm.ref_count(x) for x in p.block_table] == [2, 2]
    assert bm.num_free_blocks == 2
    c.append_token(1)                    # position 8 starts a new, private block
    bm.append_slot(c)
    assert len(c.block_table) == 3 and bm.ref_count(c.block_table[2]) == 1
    bm.check_invariants()


def test_fork_no_free_block_leaves_state_unchanged():
    bm = BlockManager(2, 4)
    p = S(range(6))
    bm.allocate(p)                       # uses both blocks
    c = S(p.token_ids)
    assert not bm.can_fork(p)
    before = snapshot(bm, [p, c])
    with pytest.raises(NoFreeBlocksError):
        bm.fork(p, c)
    assert snapshot(bm, [p, c]) == before
    bm.check_invariants()


def test_fork_misuse():
    bm = BlockManager(8, 4)
    p = S(range(5))
    bm.allocate(p)
    with pytest.raises(ValueError):
        bm.fork(p, S([1, 2, 3, 4, 5]))   # different tokens
    p.append_token(9)
    p.append_token(9)                     # two tokens without append_slot
    with pytest.raises(ValueError):
        bm.fork(p, S(p.token_ids))
    bm.check_invariants()


def test_fork_between_steps_covers_all_but_the_sampled_token():
    """The engine forks between steps: the parent's last token (sampled last step) has no
    slot yet. The child shares the covered full blocks, copies the covered partial one,
    and gets the last token's slot from its own append_slot."""
    bm = BlockManager(8, 4)
    p = S(range(6))
    bm.allocate(p)                        # blocks [a, b]: b holds positions 4, 5
    p.append_token(9)                     # position 6: sampled, no slot yet
    c = S(p.token_ids)
    assert bm.can_fork(p)
    copies = bm.fork(p, c)
    assert c.num_cached_tokens == 6 and c.block_table[0] == p.block_table[0]
    assert copies == [(p.block_table[1], c.block_table[1])] and c.block_table[1] != p.block_table[1]
    bm.append_slot(p)
    bm.append_slot(c)                     # each writes position 6 into its own block
    assert bm.slot_mapping(p, 6, 7) != bm.slot_mapping(c, 6, 7)
    q = S(range(8))
    bm.allocate(q)
    q.append_token(1)                     # covered = 8: on a block boundary, nothing to copy
    d = S(q.token_ids)
    assert bm.fork(q, d) == [] and d.block_table == q.block_table
    bm.append_slot(q)
    bm.append_slot(d)
    assert q.block_table[2] != d.block_table[2]
    bm.check_invariants()


def test_free_evictable_revived():
    bm = BlockManager(6, 4)
    a = S(list(range(8)) + [42])         # 2 full (cached) + 1 partial
    bm.allocate(a)
    blocks = list(a.block_table)
    bm.free(a)
    assert a.block_table == [] and a.num_cached_tokens == 0
    st_ = bm.get_stats()
    assert (st_["free"], st_["cached_evictable"], st_["used"]) == (4, 2, 0)
    assert bm.num_free_blocks == 6
    assert set(bm.pool._evictable) == set(blocks[:2]) and blocks[2] in bm.pool._free
    bm.free(a)                            # double free / abort is a no-op
    assert bm.get_stats() == st_
    b = S(list(range(8)) + [43])
    bm.allocate(b)
    assert b.block_table[:2] == blocks[:2] and b.num_cached_tokens == 8
    assert bm.get_stats()["cached_evictable"] == 0
    assert [bm.ref_count(x) for x in blocks[:2]] == [1, 1]
    bm.check_invariants()


def test_lru_eviction_order_and_free_first():
    bm = BlockManager(4, 2)
    p, q, r = S([1, 1]), S([2, 2]), S([3, 3])   # one full block each
    for s in (p, q, r):
        bm.allocate(s)
    bp, bq, br = p.block_table[0], q.block_table[0], r.block_table[0]
    # Free order q, p, r  ->  LRU (oldest first) = q, p, r.
    for s in (q, p, r):
        bm.free(s)
    assert list(bm.pool._evictable) == [bq, bp, br]
    # A truly free block exists (block 3): used before evicting anything.
    x = S([7, 7])
    bm.allocate(x)
    assert x.block_table == [3] and len(bm.pool._evictable) == 3
    # Next allocation evicts q's block (least recently freed).
    y = S([8, 8])
    bm.allocate(y)
    assert y.block_table == [bq]
    cached_tokens = {bm.pool._blocks[b].token_ids for b in range(4) if bm.is_cached(b)}
    assert (2, 2) not in cached_tokens and {(1, 1), (3, 3)} <= cached_tokens
    # Then p's block, then r's.
    z = S([9, 9])
    bm.allocate(z)
    assert z.block_table == [bp] and list(bm.pool._evictable) == [br]
    # r's block is still a hit (revived; the new partial block evicts nothing: pool
    # empty -> refused) ...
    assert not bm.can_allocate(S([3, 3, 0]))
    bm.free(x)                            # x's block becomes evictable, after br
    tr = S([3, 3, 0])
    bm.allocate(tr)                       # revives br, evicts x's block for the tail
    assert tr.num_cached_tokens == 2 and tr.block_table == [br, 3]
    tq = S([2, 2, 0])
    assert not bm.can_allocate(tq)
    bm.free(y)
    bm.free(z)
    bm.allocate(tq)                       # q's content is gone: no hit
    assert tq.block_table == [bq, bp]     # both evicted, least recently freed first
    assert tq.num_cached_tokens == 0
    bm.check_invariants()


def test_hits_are_revived_before_eviction():
    # No truly free block; the hit block is the LEAST recently freed one.  The
    # new tail block must evict the other cached block, not the hit.
    bm = BlockManager(2, 2)
    a, other = S([1, 1]), S([2, 2])
    bm.allocate(a)
    bm.allocate(other)
    hit, other_b = a.block_table[0], other.block_table[0]
    bm.free(a)
    bm.free(other)
    assert list(bm.pool._evictable) == [hit, other_b]
    b = S([1, 1, 3])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [hit, other_b] and b.num_cached_tokens == 2
    bm.check_invariants()


def test_free_releases_tail_first():
    bm = BlockManager(3, 1)
    a = S([1, 2, 3])
    bm.allocate(a)
    bm.free(a)
    # blocks released last-to-first: prefix block is the most recently freed
    assert list(bm.pool._evictable) == [2, 1, 0]


def test_prefix_caching_off():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a, b = S(range(9)), S(range(9))
    bm.allocate(a)
    bm.allocate(b)
    assert not set(a.block_table) & set(b.block_table)
    assert b.num_cached_tokens == 0
    bm.free(a)
    st_ = bm.get_stats()
    assert st_["cached_evictable"] == 0 and st_["free"] == 5 and st_["cached"] == 0
    c = S(range(9))
    bm.allocate(c)
    assert c.num_cached_tokens == 0
    for _ in range(4):
        b.append_token(0)
        bm.append_slot(b)
    assert not any(bm.is_cached(x) for x in range(8))
    bm.check_invariants()


def test_no_free_blocks_error_leaves_state_unchanged():
    bm = BlockManager(3, 2)
    a = S([1, 1, 2, 2, 3])               # 3 blocks, 2 full cached
    bm.allocate(a)
    b = S([5])
    assert not bm.can_allocate(b)
    before = snapshot(bm, [a, b])
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(b)
    assert snapshot(bm, [a, b]) == before
    # A prompt that would hit a's two blocks still needs one new block: none left.
    c = S([1, 1, 2, 2, 9])
    assert not bm.can_allocate(c)
    before = snapshot(bm, [a, c])
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(c)
    assert snapshot(bm, [a, c]) == before
    bm.check_invariants()


def test_can_allocate_accounts_for_hits():
    # Hits on referenced blocks are free: 1 free block suffices for a 3-block prompt.
    bm = BlockManager(4, 2)
    a = S([1, 1, 2, 2, 3])
    bm.allocate(a)
    assert bm.num_free_blocks == 1
    b = S([1, 1, 2, 2, 5])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and bm.num_free_blocks == 0
    bm.check_invariants()

    # Hits on evictable blocks take them out of the pool.
    bm = BlockManager(3, 2)
    a = S([1, 1, 2, 2, 3])
    bm.allocate(a)
    bm.free(a)                            # 2 evictable + 1 free
    assert bm.num_free_blocks == 3
    big = S([1, 1, 2, 2, 3, 3, 4])        # 4 blocks: 2 hits (revived) + 2 new > 1 left
    assert not bm.can_allocate(big)
    before = snapshot(bm, [big])
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(big)
    assert snapshot(bm, [big]) == before
    ok = S([1, 1, 2, 2, 9])               # 2 hits + 1 new == 1 left
    assert bm.can_allocate(ok)
    bm.allocate(ok)
    assert ok.num_cached_tokens == 4 and bm.num_free_blocks == 0
    bm.check_invariants()


def test_append_slot_allocation_and_registration():
    bm = BlockManager(4, 4)
    s = S(range(4))
    bm.allocate(s)
    assert len(s.block_table) == 1
    with pytest.raises(ValueError):
        bm.append_slot(s)                 # no token appended
    for t, expect_blocks in [(4, 2), (5, 2), (6, 2)]:
        s.append_token(t)
        assert bm.can_append(s)
        bm.append_slot(s)
        assert len(s.block_table) == expect_blocks
        assert not bm.is_cached(s.block_table[1])
    s.append_token(7)                     # fills block 1 -> registered
    bm.append_slot(s)
    assert len(s.block_table) == 2 and bm.is_cached(s.block_table[1])
    t = S(list(range(8)) + [0])
    bm.allocate(t)
    assert t.num_cached_tokens == 8 and t.block_table[:2] == s.block_table
    bm.check_invariants()


def test_append_slot_no_free_block():
    bm = BlockManager(1, 2)
    s = S([1, 2])
    bm.allocate(s)
    s.append_token(3)
    assert not bm.can_append(s)
    before = snapshot(bm, [s])
    with pytest.raises(NoFreeBlocksError):
        bm.append_slot(s)
    assert snapshot(bm, [s]) == before
    bm.free(s)                            # preempt
    assert bm.num_free_blocks == 1 and bm.get_stats()["cached_evictable"] == 1
    bm.check_invariants()


def test_reset_prefix_cache():
    bm = BlockManager(6, 2)
    a, keep = S([1, 1, 0]), S([2, 2, 0])
    bm.allocate(a)
    bm.allocate(keep)
    bm.free(a)
    assert bm.reset_prefix_cache() == 1
    st_ = bm.get_stats()
    assert st_["cached_evictable"] == 0 and st_["free"] == 4 and st_["cached"] == 1
    b = S([1, 1, 0])
    bm.allocate(b)
    assert b.num_cached_tokens == 0       # dropped
    c = S([2, 2, 5])
    bm.allocate(c)
    assert c.num_cached_tokens == 2       # referenced blocks stay cached
    bm.check_invariants()


def test_hash_collisions_do_not_cause_false_hits(monkeypatch):
    monkeypatch.setattr(bm_mod, "compute_block_hash", lambda prev, toks: 42)
    monkeypatch.setattr(pool_mod, "compute_block_hash", lambda prev, toks: 42)
    bm = BlockManager(6, 2)
    a = S([1, 1, 5])
    bm.allocate(a)
    b = S([2, 2, 5])                      # same "hash", other tokens
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and b.block_table[0] != a.block_table[0]
    c = S([1, 1, 6])
    bm.allocate(c)
    assert c.num_cached_tokens == 2
    bm.check_invariants()


def test_free_foreign_sequence_rejected():
    bm = BlockManager(4, 2)
    s = S([1, 2, 3])
    s.block_table.extend([0, 1])          # not handed out by this manager
    with pytest.raises(ValueError):
        bm.free(s)
    bm.check_invariants()


# ------------------------------------------------------------ stateful model
COVERAGE = {"hits": 0, "same_step_shared_writes": 0, "fork_copies": 0, "evictable_consumed": 0,
            "preemptions": 0, "alloc_refused": 0, "forks_between_steps": 0,
            "extends": 0, "extend_hits": 0, "speculations": 0, "rollbacks": 0}

tokens_st = st.lists(st.integers(0, 1), min_size=1, max_size=10)


class BlockManagerMachine(RuleBasedStateMachine):
    """Plays scheduler + model runner against a simulated KV cache.

    Step model: rules that *schedule* work (allocate, append) queue KV writes
    for the current step; `run_step` performs them (the forward pass).  Fork
    and free only touch sequences with no queued writes (contract: fork a
    fully-computed parent; free/abort are applied at step boundaries, so an
    abort of a scheduled sequence first runs the step).

    Write rule checked on every simulated KV write into block b at position p
    with token t by sequence X (invariant 5): either ref_count(b) == 1 (only X
    holds it), or b gained sharers in THIS step via prefix-cache hits of
    sequences allocated after b was registered by X's allocate/append_slot,
    and every other holder Y has b at the same table index and
    Y.token_ids[:p+1] == X.token_ids[:p+1] (it expects exactly the KV X is
    writing).  Blocks shared via fork or via hits from earlier steps must
    never be written.
    """

    caching = True

    def __init__(self):
        super().__init__()
        self.bm: BlockManager | None = None

    @initialize(num_blocks=st.integers(4, 24), bs=st.integers(1, 4))
    def init(self, num_blocks, bs):
        self.bs = bs
        self.bm = BlockManager(num_blocks, bs, enable_prefix_caching=self.caching)
        self.cache: dict[int, tuple] = {}  # slot -> token_ids[:p+1] of the writer
        self.live: list[Sequence] = []    # holding blocks
        self.waiting: list[Sequence] = [] # preempted, no blocks (recompute later)
        self.dead: list[Sequence] = []    # finished/aborted (may be aborted again)
        self.pending: dict[int, tuple[Sequence, list[int]]] = {}  # seq_id -> positions to write
        self.step_hits: set[int] = set()  # blocks that gained a sharer via a hit this step

    # ---- helpers
    def _unscheduled(self):
        return [s for s in self.live if s.seq_id not in self.pending]

    def _write(self, seq: Sequence, p: int, content: tuple | None = None) -> None:
        bs, bm = self.bs, self.bm
        slot = bm.slot_mapping(seq, p, p + 1)[0]
        b = slot // bs
        assert seq.block_table[p // bs] == b
        rc = bm.ref_count(b)
        assert rc >= 1, "write into an unreferenced block"
        if rc > 1:
            assert b in self.step_hits, f"write into block {b} shared since an earlier step / by fork"
            holders = [s for s in self.live if b in s.block_table]
            assert len(holders) == rc
            for other in holders:
                assert other.block_table.index(b) == p // bs
                assert other.token_ids[:p + 1] == seq.token_ids[:p + 1]
            COVERAGE["same_step_shared_writes"] += 1
        self.cache[slot] = tuple(seq.token_ids[:p + 1]) if content is None else content

    def _copy_block(self, src: int, dst: int) -> None:
        """What the runner does for a fork's copy: block ``src``'s KV, slot by slot, into ``dst``."""
        for k in range(self.bs):
            if src * self.bs + k in self.cache:
                self.cache[dst * self.bs + k] = self.cache[src * self.bs + k]
            else:
                self.cache.pop(dst * self.bs + k, None)
        COVERAGE["fork_copies"] += 1

    def _allocate(self, seq: Sequence) -> bool:
        bm = self.bm
        before = snapshot(bm, [seq])
        had_evictable = bm.get_stats()["cached_evictable"]
        if bm.can_allocate(seq):
            bm.allocate(seq)
            n_hit = seq.num_cached_tokens // self.bs
            assert seq.num_cached_tokens % self.bs == 0
            assert seq.num_cached_tokens <= len(seq) - 1
            assert len(seq.block_table) == bm.blocks_needed(len(seq))
            if not self.caching:
                assert n_hit == 0
            if n_hit:
                COVERAGE["hits"] += 1
            if had_evictable and bm.get_stats()["cached_evictable"] < had_evictable:
                COVERAGE["evictable_consumed"] += 1
            self.step_hits.update(seq.block_table[:n_hit])
            self.pending[seq.seq_id] = (seq, list(range(seq.num_cached_tokens, len(seq))))
            self.live.append(seq)
            return True
        with pytest.raises(NoFreeBlocksError):
            bm.allocate(seq)
        assert snapshot(bm, [seq]) == before
        COVERAGE["alloc_refused"] += 1
        return False

    def _free(self, seq: Sequence) -> None:
        if seq.seq_id in self.pending:
            self.run_step()               # aborts are applied at step boundaries
        self.bm.free(seq)
        assert seq.block_table == [] and seq.num_cached_tokens == 0
        if seq in self.live:
            self.live.remove(seq)

    # ---- rules
    @rule(tokens=tokens_st)
    def add_request(self, tokens):
        seq = Sequence(tokens)
        if not self._allocate(seq):
            self.waiting.append(seq)

    @precondition(lambda self: self.live or self.dead)
    @rule(data=st.data(), tail=st.lists(st.integers(0, 1), max_size=4))
    def add_request_sharing_prefix(self, data, tail):
        src = data.draw(st.sampled_from(self.live + self.dead))
        cut = data.draw(st.integers(0, len(src)))
        tokens = src.token_ids[:cut] + tail
        if tokens:
            self.add_request(tokens)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def resume_waiting(self, data):
        seq = data.draw(st.sampled_from(self.waiting))
        if self._allocate(seq):
            self.waiting.remove(seq)

    @precondition(lambda self: any(s.seq_id not in self.pending for s in self.live))
    @rule(data=st.data(), token=st.integers(0, 1))
    def decode(self, data, token, seq=None):
        if seq is None:
            seq = data.draw(st.sampled_from(self._unscheduled()))
        seq.append_token(token)
        if self.bm.can_append(seq):
            self.bm.append_slot(seq)
            assert len(seq.block_table) == self.bm.blocks_needed(len(seq))
            self.pending[seq.seq_id] = (seq, [len(seq) - 1])
        else:
            before = snapshot(self.bm, [seq])
            with pytest.raises(NoFreeBlocksError):
                self.bm.append_slot(seq)
            assert snapshot(self.bm, [seq]) == before
            self._free(seq)               # preempt for recompute
            self.waiting.append(seq)
            COVERAGE["preemptions"] += 1

    @precondition(lambda self: any(s.seq_id not in self.pending for s in self.live))
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 1), min_size=2, max_size=8))
    def decode_many(self, data, tokens):
        """Several decode steps of one sequence (fills the pool -> preemption)."""
        seq = data.draw(st.sampled_from(self._unscheduled()))
        for t in tokens:
            self.run_step()
            if seq not in self.live:
                break
            self.decode(data, t, seq=seq)

    @precondition(lambda self: any(s.seq_id not in self.pending for s in self.live))
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self._unscheduled()))
        child = Sequence(parent.token_ids)
        bm = self.bm
        if bm.can_fork(parent):
            copies = bm.fork(parent, child)
            assert child.num_cached_tokens == len(parent)
            partial = len(parent) % self.bs != 0
            assert len(copies) == int(partial)
            for src, dst in copies:
                assert bm.ref_count(dst) == 1 and dst == child.block_table[-1]
                assert src == parent.block_table[-1]
                self._copy_block(src, dst)
            self.live.append(child)
        else:
            before = snapshot(bm, [parent, child])
            with pytest.raises(NoFreeBlocksError):
                bm.fork(parent, child)
            assert snapshot(bm, [parent, child]) == before

    @precondition(lambda self: any(s.seq_id not in self.pending for s in self.live))
    @rule(data=st.data(), token=st.integers(0, 1), n=st.integers(1, 3))
    def fork_between_steps(self, data, token, n):
        """The engine's fork: the parent's sampled token has no slot yet; parent and
        children then each get the slot in the next decode step (or are preempted)."""
        parent = data.draw(st.sampled_from(self._unscheduled()))
        parent.append_token(token)
        family = [parent]
        for _ in range(n):
            child = Sequence(parent.token_ids)
            if not self.bm.can_fork(parent):
                break
            for src, dst in self.bm.fork(parent, child):
                self._copy_block(src, dst)
            assert child.num_cached_tokens == len(parent) - 1
            self.live.append(child)
            family.append(child)
            COVERAGE["forks_between_steps"] += 1
        for seq in family:                 # the next decode step schedules each
            if self.bm.can_append(seq):
                self.bm.append_slot(seq)
                self.pending[seq.seq_id] = (seq, [len(seq) - 1])
            else:
                self._free(seq)
                self.waiting.append(seq)
                COVERAGE["preemptions"] += 1

    @precondition(lambda self: any(s.seq_id not in self.pending for s in self.live))
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 1), min_size=1, max_size=6))
    def extend(self, data, tokens):
        """A held request extended with several tokens (its last one may have no slot
        yet, as after a finish): one prefill computes all of them over its cached KV.
        Half the time the tokens are another sequence's continuation of the same prefix,
        so the prefix cache may already hold their blocks."""
        seq = data.draw(st.sampled_from(self._unscheduled()))
        covered = len(seq)
        twins = [s for s in self.live + self.dead if len(s) > covered and s.token_ids[:covered] == seq.token_ids]
        if twins and data.draw(st.booleans()):
            tokens = data.draw(st.sampled_from(twins)).token_ids[covered:covered + 8]
        self._extend(seq, tokens)

    @precondition(lambda self: any(len(s) > 2 for s in self.live + self.dead))
    @rule(data=st.data())
    def extend_a_cached_prefix(self, data):
        """A new request holds a prefix of an earlier one, then is extended with the rest:
        the earlier one's blocks (live, or evictable if it finished) serve the extension."""
        src = data.draw(st.sampled_from([s for s in self.live + self.dead if len(s) > 2]))
        cut = data.draw(st.integers(1, len(src) - 2))
        tokens = list(src.token_ids)
        seq = Sequence(tokens[:cut])
        if not self._allocate(seq):
            self.waiting.append(seq)
            return
        self.run_step()
        self._extend(seq, tokens[cut:])

    def _extend(self, seq: Sequence, tokens) -> None:
        covered = len(seq)
        for t in tokens:
            seq.append_token(t)
        before = snapshot(self.bm, [seq])
        if self.bm.can_extend(seq):
            self.bm.extend(seq)
            assert covered <= seq.num_cached_tokens <= len(seq) - 1
            assert len(seq.block_table) == self.bm.blocks_needed(len(seq))
            hit = seq.block_table[covered // self.bs: seq.num_cached_tokens // self.bs]
            if seq.num_cached_tokens > covered:
                COVERAGE["extend_hits"] += 1
                self.step_hits.update(hit)
            self.pending[seq.seq_id] = (seq, list(range(seq.num_cached_tokens, len(seq))))
            COVERAGE["extends"] += 1
        else:
            with pytest.raises(NoFreeBlocksError):
                self.bm.extend(seq)
            assert snapshot(self.bm, [seq]) == before
            self._free(seq)               # dropped under pressure: recomputed later
            self.waiting.append(seq)

    @precondition(lambda self: any(s.seq_id not in self.pending for s in self.live))
    @rule(data=st.data(), token=st.integers(0, 1), drafts=st.lists(st.integers(0, 1), min_size=1, max_size=5),
          accepted=st.integers(0, 5), bonus=st.integers(0, 1))
    def speculate(self, data, token, drafts, accepted, bonus):
        """A verify step: the sampled token plus k drafts are computed (drafts in slots
        reserved for them), ``accepted`` drafts and a bonus token are kept, the rest rolled
        back; then the bonus gets its slot as a sampled token does."""
        seq = data.draw(st.sampled_from(self._unscheduled()))
        self.run_step()                           # the verify step is a step of its own
        seq.append_token(token)
        if not self.bm.can_append(seq):
            self._free(seq)
            self.waiting.append(seq)
            return
        self.bm.append_slot(seq)
        k = len(drafts)
        if not self.bm.can_reserve_drafts(seq, k):
            self.pending[seq.seq_id] = (seq, [len(seq) - 1])     # a plain decode step instead
            return
        before = [b for b in seq.block_table]
        self.bm.reserve_drafts(seq, k)
        assert self.bm.num_drafts(seq) == k and seq.block_table[:len(before)] == before
        for b in seq.block_table[len(before):]:
            assert self.bm.ref_count(b) == 1 and not self.bm.is_cached(b)
        n = len(seq)
        self._write(seq, n - 1)
        for j in range(k):                        # drafts go only into private blocks
            self._write(seq, n + j, tuple(seq.token_ids) + tuple(drafts[:j + 1]))
        for b in seq.block_table[(n - 1) // self.bs:]:
            assert self.bm.ref_count(b) == 1 and not self.bm.is_cached(b) or b in before
        a = min(accepted, k)
        seq.token_ids += drafts[:a] + [bonus]
        self.bm.settle_drafts(seq, a)
        assert len(seq.block_table) == self.bm.blocks_needed(n + a)
        COVERAGE["speculations"] += 1
        if a < k:
            COVERAGE["rollbacks"] += 1
        if self.bm.can_append(seq):               # the bonus token's slot, next decode step
            self.bm.append_slot(seq)
            self.pending[seq.seq_id] = (seq, [len(seq) - 1])
        else:
            self._free(seq)
            self.waiting.append(seq)

    @rule()
    def run_step(self):
        for seq, positions in self.pending.values():
            for p in positions:
                self._write(seq, p)
        self.pending.clear()
        self.step_hits.clear()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self._free(seq)
        self.dead.append(seq)

    @precondition(lambda self: self.live or self.waiting or self.dead)
    @rule(data=st.data())
    def abort(self, data):
        seq = data.draw(st.sampled_from(self.live + self.waiting + self.dead))
        self._free(seq)                   # no-op for waiting / already-freed sequences
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq not in self.dead:
            self.dead.append(seq)

    @rule()
    def abort_all(self):
        for seq in list(self.live):
            self._free(seq)
            self.dead.append(seq)
        self._check_all_released()

    @rule()
    def reset_prefix_cache(self):
        self.bm.reset_prefix_cache()
        assert self.bm.get_stats()["cached_evictable"] == 0

    # ---- invariants
    def _check_all_released(self):
        st_ = self.bm.get_stats()
        assert st_["used"] == 0
        assert st_["free"] + st_["cached_evictable"] == self.bm.num_blocks
        assert self.bm.num_free_blocks == self.bm.num_blocks

    @invariant()
    def kv_cache_holds_the_right_tokens(self):
        """(1) every computed position of every live seq reads its own token."""
        if self.bm is None:
            return
        pending_slots = {self.bm.slot_mapping(s, p, p + 1)[0]
                         for s, ps in self.pending.values() for p in ps}
        for seq in self.live:
            slots = self.bm.slot_mapping(seq, 0, len(seq))
            for p, slot in enumerate(slots):
                if slot in pending_slots:
                    continue
                assert self.cache.get(slot) == tuple(seq.token_ids[:p + 1]), (seq, p, slot)

    @invariant()
    def no_leak_no_double_free(self):
        """(2)+(3) block accounting seen from outside the manager."""
        if self.bm is None:
            return
        bm = self.bm
        refs = [0] * bm.num_blocks
        for seq in self.live:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for b in seq.block_table:
                refs[b] += 1
        for b in range(bm.num_blocks):
            assert bm.ref_count(b) == refs[b] >= 0
        referenced = sum(1 for r in refs if r)
        st_ = bm.get_stats()
        assert st_["used"] == referenced
        assert st_["free"] + st_["cached_evictable"] + referenced == bm.num_blocks
        assert bm.num_free_blocks + referenced == bm.num_blocks
        assert len(set(bm.pool._free)) == len(bm.pool._free)
        for seq in self.waiting + self.dead:
            assert seq.block_table == [] and seq.num_cached_tokens == 0
        if not self.live:
            self._check_all_released()

    @invariant()
    def manager_invariants(self):
        """(4)"""
        if self.bm is not None:
            self.bm.check_invariants()

    def teardown(self):
        if self.bm is None:
            return
        self.abort_all()
        self.bm.check_invariants()


class BlockManagerMachineNoCaching(BlockManagerMachine):
    caching = False


# derandomized: the same runs every time, so the coverage checks below cannot flake
STATEFUL_SETTINGS = settings(max_examples=300, stateful_step_count=50, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


def test_stateful_prefix_caching():
    for k in COVERAGE:
        COVERAGE[k] = 0
    run_state_machine_as_test(BlockManagerMachine, settings=STATEFUL_SETTINGS)
    print("coverage (prefix caching on):", COVERAGE)
    # The run must actually exercise the interesting paths.
    assert COVERAGE["hits"] > 0
    assert COVERAGE["same_step_shared_writes"] > 0
    assert COVERAGE["fork_copies"] > 0 and COVERAGE["forks_between_steps"] > 0
    assert COVERAGE["extends"] > 0 and COVERAGE["extend_hits"] > 0
    assert COVERAGE["speculations"] > 0 and COVERAGE["rollbacks"] > 0
    assert COVERAGE["evictable_consumed"] > 0
    assert COVERAGE["preemptions"] > 0
    assert COVERAGE["alloc_refused"] > 0


def test_stateful_no_prefix_caching():
    for k in COVERAGE:
        COVERAGE[k] = 0
    run_state_machine_as_test(BlockManagerMachineNoCaching, settings=STATEFUL_SETTINGS)
    print("coverage (prefix caching off):", COVERAGE)
    assert COVERAGE["hits"] == 0 and COVERAGE["same_step_shared_writes"] == 0
    assert COVERAGE["fork_copies"] > 0


def test_extend_reuses_cached_blocks_replacing_its_partial_block():
    """A held sequence extended with tokens whose blocks the prefix cache holds (another
    request computed them): its private partial block gives way to the cached full one,
    and only the positions after the hits are computed."""
    bm = BlockManager(12, 4)
    a = S(range(1, 10))                  # blocks [0:4] [4:8] full and registered, [8] partial
    bm.allocate(a)
    cached = list(a.block_table[:2])
    bm.free(a)
    b = S(range(1, 7))                   # shares block 0 (hit), private partial block for 4, 5
    bm.allocate(b)
    assert b.block_table[0] == cached[0] and b.num_cached_tokens == 4
    partial = b.block_table[1]
    free = bm.num_free_blocks
    b.token_ids += [7, 8, 9]             # = a's tokens: block [4:8] is in the cache
    assert bm.can_extend(b)
    bm.extend(b)
    assert b.block_table[:2] == cached                  # the partial block gave way to the cached one
    assert b.num_cached_tokens == 8 and len(b.block_table) == 3 and not bm.is_cached(b.block_table[2])
    assert bm.num_free_blocks == free - 1 + 1 - 1       # a cached block revived, the partial freed, one taken
    assert bm.ref_count(partial) == (1 if partial == b.block_table[2] else 0)
    bm.check_invariants()
