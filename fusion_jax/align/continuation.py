"""Teacher rows for target positions inside a source token (the inner positions of 1:n and n:m groups).

Target row t predicts target token t+1 from ``text[:e]``, ``e = tgt_byte_end[t]``. When ``e`` lies strictly inside
source token s (``start_s < e < end_s``), no source row predicts from that text, and the default transfer falls
back. But source row s−1 predicted token s from ``text[:start_s]``, and its top-k already says what comes after the
``P = e − start_s`` bytes the target has emitted inside token s: the candidates c whose bytes begin with those P
bytes and go on beyond them. ``p(c | c begins with them) = p(c) / Σ p(kept)`` is exact up to the top-k truncation;
each kept c maps to ``suffix[c, P]``, the longest target token that is a prefix of ``bytes(c)[P:]`` (the ``prefix``
vocabulary map of its remaining bytes), and candidates landing on the same target id add up (``merge_rows``).
A candidate that ends exactly at ``e`` says nothing about the next target token and is dropped. Given the target's
tokens (``in_context``), the candidate that is token s itself maps to the target's actual next token instead.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from fusion_jax.align.vocab import canonical_ids_by_bytes
from fusion_jax.tokenizers import Tokenizer

MAX_BYTES = 64  # bytes of a source token kept; positions deeper inside a longer token fall back


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Per source token v (L = min(longest source token, MAX_BYTES)):

    token_bytes: uint8[V_src, L]  its first L bytes, zero padded (special tokens: none)
    lengths:     int32[V_src]     its length in bytes (0 for special tokens)
    suffix:      int32[V_src, L]  suffix[v, j]: the longest target token that is a prefix of bytes(v)[j:], −1 where
                                  none or j ≥ len(v)
    """

    token_bytes: np.ndarray
    lengths: np.ndarray
    suffix: np.ndarray


@functools.lru_cache(maxsize=8)
def continuation_tables(src: Tokenizer, tgt: Tokenizer) -> Continuation:
    """The :class:`Continuation` tables of the pair (built once per pair in a process: about 3 s for 49k → 2k)."""
    by_bytes = canonical_ids_by_bytes(tgt)
    longest_target = max(map(len, by_bytes), default=0)
    width = min(max((len(b) for b, sp in zip(src.token_bytes, src.special) if not sp), default=1), MAX_BYTES)
    token_bytes = np.zeros((src.vocab_size, width), np.uint8)
    lengths = np.zeros(src.vocab_size, np.int32)
    suffix = np.full((src.vocab_size, width), -1, np.int32)
    for v, b in enumerate(src.token_bytes):
        if src.special[v] or not b:
            continue
        lengths[v] = len(b)
        head = b[:width]
        token_bytes[v, :len(head)] = np.frombuffer(head, np.uint8)
        for j in range(min(len(b), width)):
            rest = b[j:]
            for n in range(min(len(rest), longest_target), 0, -1):
                t = by_bytes.get(rest[:n])
                if t is not None:
                    suffix[v, j] = t
                    break
    return Continuation(token_bytes, lengths, suffix)


def in_context_ids(mapped: np.ndarray, cand: np.ndarray, src_next: np.ndarray, tgt_next: np.ndarray,
                   valid: np.ndarray) -> np.ndarray:
    """Rows whose text goes on with source token ``src_next`` and target token ``tgt_next`` (both starting at the
    row's end offset): the candidate equal to ``src_next`` maps to ``tgt_next``, the others keep their map.

    mapped int[r, k] (the vocab map's ids), cand int[r, k] (the source candidates), src_next int[r], tgt_next int[r],
    valid bool[r] (rows that have both next tokens) → int[r, k]."""
    hit = (cand == np.asarray(src_next)[:, None]) & np.asarray(valid, bool)[:, None]
    return np.where(hit, np.asarray(tgt_next)[:, None], mapped)


def inner_rows(src_ids: np.ndarray, src_byte_end: np.ndarray, tgt_byte_end: np.ndarray, src_topk_ids: np.ndarray,
               src_topk_logprobs: np.ndarray, tables: Continuation,
               tgt_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inner positions' candidates (module docstring).

    src_ids int[n], src_byte_end int[n], tgt_byte_end int[m], src_topk_ids int[n, k], src_topk_logprobs float[n, k]
    → (rows int64[r]: the target positions strictly inside a source token s ≥ 1, at most ``L`` bytes in;
    ids int32[r, k]: each candidate's target id, −1 where it does not continue the emitted bytes; probs
    float64[r, k]: the candidates' probabilities, to be merged and renormalised). tgt_ids int[m]: the target's tokens,
    for the in-context choice of the candidate that is the actual token."""
    src_byte_end = np.asarray(src_byte_end, np.int64)
    tgt_byte_end = np.asarray(tgt_byte_end, np.int64)
    n, k = src_topk_ids.shape
    width = tables.token_bytes.shape[1]
    s = np.searchsorted(src_byte_end, tgt_byte_end, side="right")  # the source token holding byte e (the next one)
    start = np.where(s >= 1, src_byte_end[np.clip(s - 1, 0, max(n - 1, 0))], 0) if n else np.zeros_like(s)
    depth = tgt_byte_end - start
    rows = np.flatnonzero((s >= 1) & (s < n) & (depth > 0) & (depth < width))
    if not rows.size:
        return rows, np.zeros((0, k), np.int32), np.zeros((0, k))
    s, depth = s[rows], depth[rows]
    cand = np.asarray(src_topk_ids)[s - 1]                                  # [r, k]
    probs = np.exp(np.asarray(src_topk_logprobs, np.float64)[s - 1])       # −inf pads → 0
    in_vocab = cand < len(tables.lengths)  # a model may have more embedding rows than its tokenizer has ids
    cand = np.where(in_vocab, cand, 0)
    emitted = tables.token_bytes[np.asarray(src_ids)[s]]                   # [r, L]: the actual token's bytes
    within = np.arange(width)[None, :] < depth[:, None]                    # [r, L]: the P bytes emitted so far
    same = ((tables.token_bytes[cand] == emitted[:, None, :]) | ~within[:, None, :]).all(axis=2)
    keep = same & in_vocab & (tables.lengths[cand] > depth[:, None]) & (probs > 0)
    ids = np.where(keep, tables.suffix[cand, depth[:, None]], -1)
    if tgt_ids is not None:  # the candidate that is token s itself: the target's next token
        m = len(tgt_ids)
        ids = np.where(keep, in_context_ids(ids, cand, np.asarray(src_ids)[s],
                                            np.asarray(tgt_ids)[np.minimum(rows + 1, m - 1)], rows + 1 < m), -1)
    return rows, ids.astype(np.int32), probs
