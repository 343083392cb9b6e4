"""Packing plan vs a naive reference that builds each epoch's stream explicitly and cuts it; block layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_jax.data.packing import PackingPlan, block_layout


def naive_blocks(lengths, seq_len, seed, epoch):
    """Blocks of one epoch as lists of (doc, token) pairs, from the explicit stream."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    stream = [(int(d), t) for d in order for t in range(lengths[d])]
    return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]


def plan_block_pairs(plan, g):
    segs = plan.segments(g)
    pairs, offsets = [], []
    for d, s, e, o in zip(segs.doc, segs.start, segs.end, segs.offset):
        assert e > s  # no empty segments
        offsets.append((int(o), len(pairs)))
        pairs += [(int(d), t) for t in range(s, e)]
    for o, at in offsets:  # each segment sits where the stream puts it
        assert o == at
    return pairs


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(0, 25), min_size=1, max_size=30), seq_len=st.integers(1, 40),
       seed=st.integers(0, 2**32 - 1), epochs=st.integers(1, 3))
def test_plan_matches_naive_reference(lengths, seq_len, seed, epochs):
    lengths = np.asarray(lengths)
    if lengths.sum() == 0:
        with pytest.raises(ValueError, match="no tokens"):
            PackingPlan(lengths, seq_len, seed)
        return
    plan = PackingPlan(lengths, seq_len, seed)
    g = 0
    for epoch in range(epochs):
        ref = naive_blocks(lengths, seq_len, seed, epoch)
        assert plan.blocks_per_epoch == len(ref)
        for b, block in enumerate(ref):
            assert plan.locate(g) == (epoch, b)
            assert plan_block_pairs(plan, g) == block
            g += 1
    # random access in any order gives the same blocks (no per-block state)
    fresh = pickle.loads(pickle.dumps(plan))
    for g2 in np.random.default_rng(seed).permutation(g)[:10]:
        assert plan_block_pairs(fresh, int(g2)) == plan_block_pairs(plan, int(g2))


def test_epochs_reshuffle_and_fingerprint():
    lengths = np.arange(1, 50)
    plan = PackingPlan(lengths, 16, seed=3)
    assert not np.array_equal(plan.order(0), plan.order(1))
    assert sorted(plan.order(1)) == list(range(49))
    assert PackingPlan(lengths, 16, 3).fingerprint == plan.fingerprint
    assert PackingPlan(lengths, 16, 4).fingerprint != plan.fingerprint
    assert PackingPlan(lengths, 17, 3).fingerprint != plan.fingerprint
    assert plan.tokens_per_epoch == lengths.sum() and plan.blocks_per_epoch == -(-lengths.sum() // 16)


def test_layout_segments_loss_mask_and_official_mode():
    # docs of 5, 3, 7 tokens, order fixed by choosing lengths and reading the plan's order
    lengths = np.array([5, 3, 7])
    plan = PackingPlan(lengths, 8, seed=0)
    order = plan.order(0)
    T = 8
    for g in range(plan.blocks_per_epoch):
        segs = plan.segments(g)
        lay = block_layout(segs, T, mask_documents=True)
        n = segs.length
        stream_docs = np.repeat(order, lengths[order])[g * T:(g + 1) * T]
        np.testing.assert_array_equal(lay["doc_index"][:n], stream_docs)
        assert (lay["doc_index"][n:] == -1).all() and (lay["segment_ids"][n:] == 0).all()
        # segment ids 1..S in order, one per piece
        expected_seg = np.repeat(np.arange(1, len(segs) + 1), segs.end - segs.start)
        np.testing.assert_array_equal(lay["segment_ids"][:n], expected_seg)
        for t in range(T):
            nxt_same = t + 1 < T and lay["segment_ids"][t] != 0 and lay["segment_ids"][t + 1] == lay["segment_ids"][t]
            assert lay["loss_mask"][t] == nxt_same
        # positions restart per segment, doc_pos is the token index in its document
        for j, (s, e, o) in enumerate(zip(segs.start, segs.end, segs.offset)):
            np.testing.assert_array_equal(lay["positions"][o:o + e - s], np.arange(e - s))
            np.testing.assert_array_equal(lay["doc_pos"][o:o + e - s], np.arange(s, e))
        off = block_layout(segs, T, mask_documents=False)
        assert (off["segment_ids"][:n] == 1).all() and (off["segment_ids"][n:] == 0).all()
        np.testing.assert_array_equal(off["positions"][:n], np.arange(n))
        np.testing.assert_array_equal(off["loss_mask"], np.arange(T) < n - 1)  # across documents, not into padding


def test_segment_boundaries_straddle():
    plan = PackingPlan(np.array([10]), 4, seed=0)
    assert plan.blocks_per_epoch == 3
    got = [(int(s.start[0]), int(s.end[0]), int(s.offset[0])) for s in map(plan.segments, range(3))]
    assert got == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]
    lay = block_layout(plan.segments(2), 4)
    np.testing.assert_array_equal(lay["loss_mask"], [True, False, False, False])
    np.testing.assert_array_equal(plan_block_pairs(plan, 3), plan_block_pairs(plan, 0))  # epoch 1 of one document
    with pytest.raises(IndexError):
        plan.segments(-1)
