"""Persistent decode inputs (engine/worker/decode_inputs.py) against inputs built from scratch.

The reference is the plain construction the engine used before: for each sequence of
a decode batch, position len-1, its last token, slot table[p // bs] * bs + p % bs,
context len and its block table padded with zeros. Random batches come from a real
BlockManager (allocate, decode growth, preemption, finish, new arrivals), so tables
grow, get replaced and rows get reused. In the GPU check (SELFRAG_TEST_DEVICE=cuda) the
buffers live on the GPU and the staging copy comes from pinned memory."""
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from engine.core.block_manager import BlockManager
from engine.core.sequence import Sequence
from engine.worker.decode_inputs import DecodeInputs
from tests.helpers import DEVICE

BS, MAX_BLOCKS, ROWS, NUM_BLOCKS = 4, 8, 6, 40


def _expected(seqs, b):
    pos, tok, ctx, slot, tables = [], [], [], [], []
    for s in seqs:
        p = len(s) - 1
        pos.append(p)
        tok.append(s.token_ids[p])
        ctx.append(len(s))
        slot.append(s.block_table[p // BS] * BS + p % BS)
        tables.append(list(s.block_table))
    pad = b - len(seqs)
    return pos + [0] * pad, tok + [0] * pad, ctx + [0] * pad, slot + [-1] * pad, tables


def _check(inputs, seqs, b):
    max_ctx = inputs.stage(seqs, b)
    inputs.unpack(b)
    ids, positions, meta = inputs.views(b, max_ctx)
    pos, tok, ctx, slot, tables = _expected(seqs, b)
    assert positions.tolist() == pos
    assert ids.tolist() == tok
    assert meta.context_lens.tolist() == ctx and meta.context_lens.dtype == torch.int32
    assert meta.slot_mapping.tolist() == slot and meta.slot_mapping.dtype == torch.int64
    assert meta.block_tables.shape == (b, MAX_BLOCKS) and meta.block_tables.dtype == torch.int32
    # Each row starts with the sequence's table. Past it (masked by context_lens, never
    # read) a row may hold a former table's entries, which still name real blocks.
    got = meta.block_tables[:len(seqs)].tolist()                  # padding rows: never read
    assert [row[:len(t)] for row, t in zip(got, tables)] == tables
    assert 0 <= meta.block_tables.min() and meta.block_tables.max() < NUM_BLOCKS
    assert meta.query_start_loc.tolist() == list(range(b + 1))
    assert max_ctx == max(ctx)
    for t in (ids, positions, meta.slot_mapping, meta.context_lens, meta.block_tables):
        assert t.data_ptr() % 16 == 0              # what the kernels' pointer hints assume


def _decode_step(bm, running, rng):
    for s in running:
        s.append_token(rng.randrange(3, 100))
        bm.append_slot(s)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 32 - 1))
def test_random_batches_match_the_from_scratch_inputs(seed):
    rng = random.Random(seed)
    bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=rng.random() < 0.5)
    inputs = DecodeInputs(ROWS, MAX_BLOCKS, BS, torch.device(DEVICE))
    running: list[Sequence] = []
    for _ in range(25):
        op = rng.random()
        if op < 0.3 and len(running) < ROWS:           # a new sequence (maybe a shared prefix)
            prompt = [1] + [rng.randrange(3, 9) for _ in range(rng.randrange(1, 12))]
            s = Sequence(prompt)
            if bm.can_allocate(s):
                bm.allocate(s)
                running.append(s)
        elif op < 0.4 and running:                     # finish / abort one
            s = running.pop(rng.randrange(len(running)))
            bm.free(s)
        elif op < 0.5 and running:                     # preempt and re-prefill one in place
            s = running[rng.randrange(len(running))]
            bm.free(s)
            bm.allocate(s)
        elif running:                                  # decode growth
            for s in [s for s in running if len(s) >= BS * MAX_BLOCKS - 1]:
                running.remove(s)                      # at max_model_len: finished
                bm.free(s)
            if bm.num_free_blocks >= len(running):     # room for every new block
                _decode_step(bm, running, rng)
        if running:
            order = running[:]
            if rng.random() < 0.2:
                rng.shuffle(order)
            b = len(order) + rng.randrange(0, ROWS - len(order) + 1)
            _check(inputs, order, b)


def test_one_copy_per_step_and_only_new_blocks_are_sent():
    bm = BlockManager(NUM_BLOCKS, BS)
    inputs = DecodeInputs(ROWS, MAX_BLOCKS, BS, torch.device(DEVICE))
    seqs = [Sequence([1, 5, 6, 7, 8, 9][:n]) for n in (2, 5, 6)]
    for s in seqs:
        bm.allocate(s)
    rng = random.Random(0)
    _check(inputs, seqs, 4)
    assert inputs.upload.num_uploads == 1
    assert inputs.num_table_entries_sent == sum(len(s.block_table) for s in seqs)   # first time: whole tables
    for step in range(10):
        before = [len(s.block_table) for s in seqs]
        sent0, up0 = inputs.num_table_entries_sent, inputs.upload.num_uploads
        _decode_step(bm, seqs, rng)
        _check(inputs, seqs, 4)
        assert inputs.upload.num_uploads == up0 + 1
        new_blocks = sum(len(s.block_table) - n for s, n in zip(seqs, before))
        assert inputs.num_table_entries_sent - sent0 == new_blocks     # only the appended entries


def test_a_freed_row_is_reused_and_rewritten():
    bm = BlockManager(NUM_BLOCKS, BS)
    inputs = DecodeInputs(2, MAX_BLOCKS, BS, torch.device(DEVICE))
    a, b = Sequence([1] * 9), Sequence([1, 2, 3])
    for s in (a, b):
        bm.allocate(s)
    _check(inputs, [a, b], 2)
    bm.free(a)
    c = Sequence([1, 4, 4, 4, 4, 4, 4])               # takes a's row, other blocks
    bm.allocate(c)
    _check(inputs, [b, c], 2)
    d = Sequence([7, 7])
    bm.allocate(d)
    with pytest.raises(ValueError, match="at most 2"):
        inputs.stage([b, c, d], 3)


def test_a_failed_stage_resends_whole_tables():
    """A sequence past max_blocks is refused with a clear error, and the rows staged before
    it in that call are rewritten in full next time (their entries never reached the device)."""
    bm = BlockManager(NUM_BLOCKS, BS)
    inputs = DecodeInputs(ROWS, 2, BS, torch.device(DEVICE))
    ok, long = Sequence([1, 5, 6]), Sequence([1] * (2 * BS + 1))
    for s in (ok, long):
        bm.allocate(s)
    with pytest.raises(ValueError, match="KV blocks"):
        inputs.stage([ok, long], 2)
    bm.free(long)
    sent = inputs.num_table_entries_sent
    inputs.stage([ok], 1)
    inputs.unpack(1)
    assert inputs.num_table_entries_sent - sent == len(ok.block_table)
    assert inputs.views(1, len(ok))[2].block_tables[0, :len(ok.block_table)].tolist() == ok.block_table
