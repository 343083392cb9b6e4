"""The packer of capture and evaluation (fusion_jax.data.scoring): rows sized to their items, against a naive
reference and its invariants."""

import numpy as np
import pytest

from fusion_jax.data.scoring import pack_batches, row_lengths


def naive_pack(sizes, rows_per_batch, lengths):
    """First-fit decreasing, written out: repeatedly open a batch for the longest item left, then offer every item
    left (longest first) to the batch's rows in order."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    placed = set()
    out = []
    while len(placed) < len(sizes):
        first = next(i for i in order if i not in placed)
        length = min(n for n in lengths if n >= sizes[first])
        rows = [[] for _ in range(rows_per_batch)]
        for i in order:
            if i in placed:
                continue
            for row in rows:
                if sum(sizes[j] for j in row) + sizes[i] <= length:
                    row.append(i)
                    placed.add(i)
                    break
        out.append((length, [row for row in rows if row]))
    return out


def test_row_lengths():
    assert row_lengths(1024) == (256, 384, 512, 640, 768, 896, 1024)  # never shorter than 256
    assert row_lengths(1000) == (256, 376, 504, 632, 752, 880, 1000)  # multiples of 8, the last is seq_len
    assert row_lengths(512) == (256, 320, 384, 448, 512)
    assert row_lengths(256) == (256,) and row_lengths(100) == (100,) and row_lengths(5) == (5,)  # one shape
    assert row_lengths(1024, shortest=128) == (128, 256, 384, 512, 640, 768, 896, 1024)
    assert row_lengths(16, shortest=1) == (8, 16)
    assert row_lengths(2048, steps=2) == (1024, 2048)


@pytest.mark.parametrize("seed", range(6))
def test_pack_batches_matches_naive_and_invariants(seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.choice([64, 200, 1024]))  # one row length, two, eight
    sizes = [int(x) for x in rng.integers(1, seq_len + 1, size=int(rng.integers(1, 60)))]
    rows_per_batch = int(rng.integers(1, 6))
    lengths = row_lengths(seq_len)
    batches = pack_batches(sizes, rows_per_batch, lengths)
    assert [(b.length, b.rows) for b in batches] == naive_pack(sizes, rows_per_batch, lengths)
    seen = sorted(i for b in batches for row in b.rows for i in row)
    assert seen == list(range(len(sizes)))  # every item exactly once
    for b in batches:
        assert 1 <= len(b.rows) <= rows_per_batch and all(b.rows)
        assert all(sum(sizes[i] for i in row) <= b.length for row in b.rows)
        longest = max(sizes[i] for row in b.rows for i in row)
        assert b.length == min(n for n in lengths if n >= longest)  # the shortest row length that holds it


def test_pack_batches_short_documents_get_short_rows():
    batches = pack_batches([900, 100, 120, 110, 30], 2, row_lengths(1024))
    assert [(b.length, b.rows) for b in batches] == [(1024, [[0, 2], [3, 1, 4]])]  # 900 + 120 + 30 > 1024
    batches = pack_batches([100, 120, 110, 30, 20], 1, row_lengths(1024, shortest=128))
    assert [b.length for b in batches] == [128, 128, 128, 128]  # never a 1024-token row for them
    assert [b.rows for b in batches] == [[[1]], [[2]], [[0, 4]], [[3]]]  # 100 + 30 > 128, 100 + 20 fits
    batches = pack_batches([100, 120, 110, 30, 20], 1, row_lengths(1024))
    assert [(b.length, b.rows) for b in batches] == [(256, [[1, 2, 4]]), (256, [[0, 3]])]
    assert pack_batches([], 4, row_lengths(64)) == []


def test_pack_batches_refuses_an_item_longer_than_every_row():
    with pytest.raises(ValueError, match="300 tokens"):
        pack_batches([10, 300], 2, row_lengths(256))
