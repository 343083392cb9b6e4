"""Byte chunks for likelihood matching: the spans of text that a teacher's tokens and the target's both cut at.

Each group of the byte alignment (``align.bytes``) covers exactly the same bytes on both sides, so the teacher's
log-probability of its own tokens there and the target's log-probability of its tokens there are probabilities of
the same event, "the text goes on with these bytes", comparable across vocabularies (``fusion.likelihood``).

A group is a chunk when every token in it on both sides was predicted (not a document's first token), owns bytes
(an EOS or an empty dummy-prefix piece on one side has no partner on the other) and has a finite cached CE.
"""

from __future__ import annotations

import numpy as np

from fusion_jax.align.bytes import align_bytes


def byte_chunks(src_byte_end: np.ndarray, src_token_ce: np.ndarray,
                tgt_byte_end: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One document's chunks.

    src_byte_end int[n], src_token_ce float[n] (the cache's ``token_ce``: −log p(token i+1) at i, NaN at the last),
    tgt_byte_end int[m] → (first int32[c], last int32[c]: each chunk's first and last target token, ascending;
    logprob float64[c]: the teacher's log-probability of its tokens in the chunk, −Σ of their CE)."""
    src_be = np.asarray(src_byte_end, np.int64)
    tgt_be = np.asarray(tgt_byte_end, np.int64)
    ce = np.asarray(src_token_ce, np.float64)
    if len(ce) != len(src_be):
        raise ValueError(f"token CE ({len(ce)}) and source byte offsets ({len(src_be)}) must have the same length")
    none = np.zeros(0, np.int32)
    if not len(src_be) or not len(tgt_be):
        return none, none, np.zeros(0)
    aln = align_bytes(src_be, tgt_be)
    g = aln.num_groups
    bad = np.zeros(g, bool)
    bad[aln.src_group[np.diff(src_be, prepend=0) == 0]] = True  # tokens without bytes
    bad[aln.tgt_group[np.diff(tgt_be, prepend=0) == 0]] = True
    bad[aln.src_group[0]] = bad[aln.tgt_group[0]] = True       # a document's first token is never predicted
    token_ce = ce[:-1]                                           # CE of source tokens 1..n−1
    bad[aln.src_group[1:][~np.isfinite(token_ce)]] = True
    logprob = -np.bincount(aln.src_group[1:], weights=np.where(np.isfinite(token_ce), token_ce, 0.0), minlength=g)
    groups = np.arange(g)
    first = np.searchsorted(aln.tgt_group, groups, side="left")
    last = np.searchsorted(aln.tgt_group, groups, side="right") - 1
    keep = ~bad
    return first[keep].astype(np.int32), last[keep].astype(np.int32), logprob[keep]
