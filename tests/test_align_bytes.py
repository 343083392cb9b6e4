"""The `bytes` alignment against a naive reference, on random segmentations of the same text."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fusion_jax.align.bytes import GROUP_KINDS, align_bytes


def naive_groups(src_end, tgt_end):
    """Walk both token lists; close a group whenever both sides sit on the same boundary."""
    common = sorted(set(src_end) & set(tgt_end))
    src_group = [next(i for i, b in enumerate(common) if e <= b) for e in src_end]
    tgt_group = [next(i for i, b in enumerate(common) if e <= b) for e in tgt_end]
    kinds = []
    for g in range(len(common)):
        ns, nt = src_group.count(g), tgt_group.count(g)
        kinds.append({(True, True): "1:1", (False, True): "n:1", (True, False): "1:n", (False, False): "n:m"}[ns <= 1, nt <= 1])
    return src_group, tgt_group, common, kinds


segmentation = st.integers(1, 60).flatmap(
    lambda total: st.tuples(
        st.just(total),
        st.lists(st.integers(0, total), max_size=40),  # source cuts (repeats = empty-span tokens)
        st.lists(st.integers(0, total), max_size=40),
    )
)


@settings(max_examples=300, deadline=None)
@given(segmentation)
def test_matches_naive_reference(case):
    total, src_cuts, tgt_cuts = case
    src_end = np.array(sorted(src_cuts) + [total])
    tgt_end = np.array(sorted(tgt_cuts) + [total])
    a = align_bytes(src_end, tgt_end)
    src_group, tgt_group, common, kinds = naive_groups(list(src_end), list(tgt_end))
    np.testing.assert_array_equal(a.src_group, src_group)
    np.testing.assert_array_equal(a.tgt_group, tgt_group)
    np.testing.assert_array_equal(a.boundaries, common)
    np.testing.assert_array_equal([GROUP_KINDS[k] for k in a.kind], kinds)
    # Groups are monotone and each covers the same bytes on both sides.
    assert np.all(np.diff(a.src_group) >= 0) and np.all(np.diff(a.tgt_group) >= 0)
    for g in range(a.num_groups):
        assert src_end[a.src_group == g].max() == tgt_end[a.tgt_group == g].max() == a.boundaries[g]


def test_worked_example():
    # "Hello world": source "Hello| world"; target "Hel|lo| wor|ld"
    a = align_bytes([5, 11], [3, 5, 9, 11])
    np.testing.assert_array_equal(a.src_group, [0, 1])
    np.testing.assert_array_equal(a.tgt_group, [0, 0, 1, 1])
    assert [GROUP_KINDS[k] for k in a.kind] == ["1:n", "1:n"]


def test_rejects_different_texts_and_unsorted_offsets():
    with pytest.raises(ValueError, match="source ends at byte 5, target at byte 6"):
        align_bytes([5], [6])
    with pytest.raises(ValueError, match="non-decreasing"):
        align_bytes([3, 2, 5], [5])
