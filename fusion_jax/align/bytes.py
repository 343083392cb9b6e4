"""Exact sequence alignment on byte offsets (the default `bytes` mode).

Two tokenizations of the same UTF-8 text are cut at every byte offset where both have a token boundary; the tokens
between two consecutive common boundaries form a group that covers exactly the same bytes on both sides. Groups are
1:1, n:1 (several source tokens, one target token), 1:n or n:m, counting the tokens that own bytes. Tokens with empty
spans (special tokens such as EOS, a leading SentencePiece ``▁`` that only carries the dummy prefix) join the group
that ends at their offset but do not change its kind: a last word plus EOS on both sides is 1:1, not n:m.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ONE_TO_ONE, MANY_TO_ONE, ONE_TO_MANY, MANY_TO_MANY = 0, 1, 2, 3
GROUP_KINDS = ("1:1", "n:1", "1:n", "n:m")


@dataclasses.dataclass(frozen=True)
class ByteAlignment:
    """src_group int32[n], tgt_group int32[m]: group of each token; boundaries int32[G]: end byte of each group;
    kind int8[G]: ONE_TO_ONE | MANY_TO_ONE | ONE_TO_MANY | MANY_TO_MANY (by source:target counts of byte-owning
    tokens; empty-span tokens do not count)."""

    src_group: np.ndarray
    tgt_group: np.ndarray
    boundaries: np.ndarray
    kind: np.ndarray

    @property
    def num_groups(self) -> int:
        return len(self.boundaries)


def _sorted_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distinct values in both of two sorted arrays (np.intersect1d without its sorts)."""
    a = a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a
    if not len(a) or not len(b):
        return a[:0]
    pos = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return a[b[pos] == a]


def align_bytes(src_byte_end: np.ndarray, tgt_byte_end: np.ndarray) -> ByteAlignment:
    """src_byte_end int[n], tgt_byte_end int[m] (non-decreasing end offsets into the same text) → ByteAlignment.

    Both tokenizations must cover the same text: their last offsets must be equal.
    """
    src = np.asarray(src_byte_end, np.int64)
    tgt = np.asarray(tgt_byte_end, np.int64)
    for name, a in (("source", src), ("target", tgt)):
        if a.ndim != 1:
            raise ValueError(f"{name} byte_end must be 1-D, got shape {a.shape}")
        if len(a) and (np.any(np.diff(a) < 0) or a[0] < 0):
            raise ValueError(f"{name} byte_end must be non-decreasing and non-negative")
    src_total = int(src[-1]) if len(src) else 0
    tgt_total = int(tgt[-1]) if len(tgt) else 0
    if src_total != tgt_total:
        raise ValueError(
            f"the tokenizations cover different text: source ends at byte {src_total}, target at byte {tgt_total}"
        )
    boundaries = _sorted_intersection(src, tgt)
    src_group = np.searchsorted(boundaries, src, side="left").astype(np.int32)
    tgt_group = np.searchsorted(boundaries, tgt, side="left").astype(np.int32)
    g = len(boundaries)
    n_src = np.bincount(src_group[np.diff(src, prepend=0) > 0], minlength=g)  # byte-owning tokens per group
    n_tgt = np.bincount(tgt_group[np.diff(tgt, prepend=0) > 0], minlength=g)
    kind = np.where(
        n_src <= 1,
        np.where(n_tgt <= 1, ONE_TO_ONE, ONE_TO_MANY),
        np.where(n_tgt <= 1, MANY_TO_ONE, MANY_TO_MANY),
    ).astype(np.int8)
    return ByteAlignment(src_group, tgt_group, boundaries.astype(np.int32), kind)
