"""FuseLLM's DTW sequence alignment (the `fusellm` mode), with identical paths and compiled.

The official ``others.py::dtw`` fills an (n+1)×(m+1) float64 matrix in a pure-Python double loop, calling an edit
distance for every cell, and back-traces with ``argmin([diag, up, left])``. Here:

* edit distances are computed once per *distinct* token pair with rapidfuzz (C++, bit-parallel Levenshtein on
  code points, the same metric as the official ``editdistance.eval``); a 2k×2k document has ~300×300 distinct pairs;
* the DP and the back-trace are compiled with numba and read the distance table through the token → distinct-string
  indices, so the n×m cost matrix is never built. Costs are small integers, so the int32 sums are exact and every
  comparison (hence every tie) is the one the float64 official code makes.

``series_src`` is the official ``series_1`` (the blending/source model, matrix rows) and ``series_tgt`` is
``series_2`` (the base/target model, columns). Tie order on the back-trace: ``"official"`` = diag > up (source−1) >
left (target−1), numpy's first minimum; ``"fusechat_v2"`` = diag > left > up (FuseChat-v2's ``align_token_and_vocab``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numba
import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

TieOrder = Literal["official", "fusechat_v2"]
TIE_ORDERS: tuple[str, ...] = ("official", "fusechat_v2")


@dataclasses.dataclass(frozen=True)
class DtwAlignment:
    """The warping path and its cost.

    src_index, tgt_index: int32[P]  the matched (source, target) index pairs in path order, from (0, 0) to
                                    (n−1, m−1); both non-decreasing, every index of both sequences appears.
    cost:                 int       sum of the edit distances along the path (official ``matrix[-1, -1]``).
    """

    src_index: np.ndarray
    tgt_index: np.ndarray
    cost: int

    def tgt_spans(self, num_tgt: int) -> tuple[np.ndarray, np.ndarray]:
        """→ (first int32[m], count int32[m]): target j is matched to source positions first[j] .. first[j]+count[j]−1
        (the official ``base_to_blending[j]``, always a non-empty contiguous run)."""
        first = np.full(num_tgt, np.iinfo(np.int32).max, np.int32)
        np.minimum.at(first, self.tgt_index, self.src_index)
        count = np.bincount(self.tgt_index, minlength=num_tgt).astype(np.int32)
        return first, count

    def src_spans(self, num_src: int) -> tuple[np.ndarray, np.ndarray]:
        """→ (first int32[n], count int32[n]): the official ``blending_to_base`` as runs of target positions."""
        first = np.full(num_src, np.iinfo(np.int32).max, np.int32)
        np.minimum.at(first, self.src_index, self.tgt_index)
        count = np.bincount(self.src_index, minlength=num_src).astype(np.int32)
        return first, count


def distinct(strings: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """strings[n] → (distinct strings in first-seen order, index int32[n] into them)."""
    seen: dict[str, int] = {}
    index = np.fromiter((seen.setdefault(s, len(seen)) for s in strings), np.int32, len(strings))
    return list(seen), index


def edit_distances(a: Sequence[str], b: Sequence[str], workers: int = 1) -> np.ndarray:
    """a[p], b[q] → int32[p, q] Levenshtein distances on Unicode code points (insert = delete = substitute = 1)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.int32)
    return cdist(list(a), list(b), scorer=Levenshtein.distance, dtype=np.int32, workers=workers)


@numba.njit(cache=True, nogil=True)
def _accumulate(dist: np.ndarray, src_idx: np.ndarray, tgt_idx: np.ndarray) -> np.ndarray:  # pragma: no cover
    """dist int32[P, Q] (distinct pairs), src_idx int32[n], tgt_idx int32[m] → D int32[n, m], the official trimmed
    matrix: D[i, j] = dist(i, j) + min(D[i−1, j], D[i, j−1], D[i−1, j−1]) with +inf outside and D[−1, −1] = 0."""
    n, m = src_idx.shape[0], tgt_idx.shape[0]
    acc = np.empty((n, m), np.int32)
    row = dist[src_idx[0]]
    run = 0
    for j in range(m):
        run += row[tgt_idx[j]]
        acc[0, j] = run
    for i in range(1, n):
        row = dist[src_idx[i]]
        prev = acc[i - 1]
        cur = acc[i]
        left = prev[0] + row[tgt_idx[0]]
        cur[0] = left
        for j in range(1, m):
            best = prev[j - 1]
            if prev[j] < best:
                best = prev[j]
            if left < best:
                best = left
            left = best + row[tgt_idx[j]]
            cur[j] = left
    return acc


@numba.njit(cache=True, nogil=True)
def _backtrace(acc: np.ndarray, left_before_up: bool) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """The official back-trace from (n−1, m−1) to (0, 0): → (src_index int32[P], tgt_index int32[P]) in path order."""
    n, m = acc.shape
    big = np.iinfo(np.int32).max
    src = np.empty(n + m, np.int32)
    tgt = np.empty(n + m, np.int32)
    i, j, k = n - 1, m - 1, 0
    while i > 0 or j > 0:
        src[k] = i
        tgt[k] = j
        k += 1
        diag = acc[i - 1, j - 1] if (i > 0 and j > 0) else big
        up = acc[i - 1, j] if i > 0 else big
        left = acc[i, j - 1] if j > 0 else big
        if diag <= up and diag <= left:
            i -= 1
            j -= 1
        elif (up <= left) if not left_before_up else (up < left):
            i -= 1
        else:
            j -= 1
    src[k] = 0
    tgt[k] = 0
    k += 1
    return src[:k][::-1].copy(), tgt[:k][::-1].copy()


def dtw(series_src: Sequence[str], series_tgt: Sequence[str], tie_order: TieOrder = "official") -> DtwAlignment:
    """Official DTW over two token-string sequences (n ≥ 1, m ≥ 1) with edit-distance cost → DtwAlignment.

    Strings are compared as given; the caller strips prefix characters (see ``fusellm.dtw_tokens``).
    """
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie_order must be one of {TIE_ORDERS}, got {tie_order!r}")
    if not len(series_src) or not len(series_tgt):
        raise ValueError(
            f"dtw needs two non-empty token sequences, got lengths {len(series_src)} and {len(series_tgt)} "
            "(an empty document has nothing to align; drop it before alignment)"
        )
    src_strings, src_idx = distinct(series_src)
    tgt_strings, tgt_idx = distinct(series_tgt)
    dist = edit_distances(src_strings, tgt_strings)
    acc = cost_matrix(dist, src_idx, tgt_idx)
    src, tgt = _backtrace(acc, tie_order == "fusechat_v2")
    return DtwAlignment(src, tgt, int(acc[-1, -1]))


def cost_matrix(dist: np.ndarray, src_idx: np.ndarray, tgt_idx: np.ndarray) -> np.ndarray:
    """dist int32[P, Q], src_idx int32[n], tgt_idx int32[m] → int32[n, m] accumulated DTW costs (official trimmed
    matrix). Raises if the sums could overflow int32 (they cannot for token strings: n+m ≤ 2³¹ / max distance)."""
    dist = np.ascontiguousarray(dist, np.int32)
    bound = int(dist.max(initial=0)) * (len(src_idx) + len(tgt_idx))
    if bound >= np.iinfo(np.int32).max:
        raise OverflowError(f"DTW costs could reach {bound}, beyond int32; split the document")
    return _accumulate(dist, np.ascontiguousarray(src_idx, np.int32), np.ascontiguousarray(tgt_idx, np.int32))
