"""engine/spec_decode/proposers.py against a brute-force prompt lookup."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from engine.spec_decode.proposers import NgramProposer


def brute(toks, k, lo, hi):
    """The latest earlier occurrence of the longest suffix of lo..hi tokens."""
    for n in range(min(hi, len(toks)), lo - 1, -1):
        suffix = toks[len(toks) - n:]
        for j in range(len(toks) - n - 1, -1, -1):          # ends before the suffix's end
            if toks[j:j + n] == suffix:
                return toks[j + n:j + n + k]
    return []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.lists(st.integers(1, 6), max_size=8),
       st.integers(1, 3), st.integers(0, 2), st.integers(1, 5))
def test_incremental_index_equals_brute_force(toks, cuts, lo, extra, k):
    hi = lo + extra
    p = NgramProposer(lo, hi)
    seq = []
    for chunk in [toks[:c] for c in sorted(cuts)] + [toks]:      # the sequence grows step by step
        seq = list(chunk) if len(chunk) >= len(seq) else seq
        assert p.propose(7, seq, k) == brute(seq, k, lo, hi)


def test_forget_and_bad_bounds():
    p = NgramProposer(1, 2)
    assert p.propose(1, [5, 6, 5], 3) == [6, 5]
    p.forget(1)
    assert p.propose(1, [9, 9], 2) == [9]
    with pytest.raises(ValueError):
        NgramProposer(3, 2)


def test_shared_lookup_drafts_from_finished_sequences():
    """With ``shared``, what a finished sequence wrote drafts for another one whose own
    text has no match; without it, nothing is proposed."""
    for shared, want in ((True, [40, 41, 42]), (False, [])):
        p = NgramProposer(2, 3, shared=shared)
        p.propose(1, [9, 10, 11, 12, 40, 41, 42, 43], 3)
        p.forget(1)
        assert p.propose(2, [5, 6, 7, 11, 12], 3) == want
        assert p.propose(3, [1, 2, 3, 4, 5], 3) == []
    p = NgramProposer(1, 2, shared=True, shared_entries=2)
    p.propose(1, [1, 2, 3, 4, 5, 6], 1)
    p.forget(1)
    assert all(len(t) <= 2 for t in p.shared.values())
