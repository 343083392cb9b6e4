"""Top-k transfer onto target positions (default `bytes` mode) and the sparse-row type both modes produce.

Target row t predicts target token t+1 from the text before it, ``text[:tgt_byte_end[t]]``. The default mode uses a
source row only where the source predicted from exactly the same text: source row s with ``src_byte_end[s] ==
tgt_byte_end[t]`` (and, among tokens that end at the same offset — special tokens own empty spans — the same rank,
so a BOS/EOS row never stands in for a text row). Per group of the byte alignment (``align.bytes``):

* 1:1 and n:1 groups (one target token): the target token ends on a common boundary → its row is transferred
  (from the last source token of the group).
* 1:n and n:m groups (several target tokens): only the group's last target token ends on a common boundary and is
  transferred; the inner ones predict a continuation *inside* a source token, which a next-token distribution over
  source tokens does not give directly → fallback, or, with ``continuation`` tables, the previous source row's
  candidates that continue the bytes emitted so far inside the token (``align.continuation``).

A transferred row maps every top-k source id through the vocab map (``prefix`` by default), sums the probability
of candidates that land on the same target id, drops unmapped ones (−1) and renormalises over what is left.
With ``in_context``, the candidate that *is* the text's next source token maps to the target's actual next token
instead (:func:`in_context_ids`): the target tokenizer's own choice for those bytes in that context, which the
longest-prefix map misses where the target cuts shorter (code indentation: ``'    '`` → ``▁▁▁▁`` where the target
emits ``▁▁▁`` before a word) or longer (a row before an n:1 group) than the prefix. Given the teacher's exact
log-probability of each next source token (``src_next_logprob``, the cache's per-token CE), that candidate takes the
last place of a row whose top-k lacks it (:func:`with_next_token`), so a row never leaves out the text's own
continuation; with ``tail="next_token"`` it also takes the teacher's mass outside the row's candidates
(:func:`tail_to_next`) instead of the top-k sharing it by renormalisation (matched rows; rows inside a source token
are conditionals and stay renormalised). A row where nothing is left, and every non-transferred position, falls back to ``onehot_next`` (probability 1 on the
actual next target token; the last position of a document, which has no next token, is empty) or ``mask`` (empty).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from fusion_jax.align.continuation import Continuation, in_context_ids, inner_rows

ROW_TEACHER, ROW_ONEHOT, ROW_EMPTY = 0, 1, 2
ROW_KINDS = ("teacher", "onehot", "empty")
Fallback = Literal["onehot_next", "mask"]
FALLBACKS: tuple[str, ...] = ("onehot_next", "mask")
Tail = Literal["renormalize", "next_token"]
TAILS: tuple[str, ...] = ("renormalize", "next_token")


@dataclasses.dataclass(frozen=True)
class SparseRows:
    """Per-target-position teacher rows.

    ids:      int32[m, k]   target ids, best first; pads are id 0 with logprob −inf.
    logprobs: float32[m, k] log-weights; the row's distribution is the softmax over its non-pad entries (default-mode
                            rows are normalised log-probabilities already; `fusellm` rows carry the teacher's values
                            unchanged over the kept subset, as the official collator expects).
    kind:     int8[m]       ROW_TEACHER | ROW_ONEHOT | ROW_EMPTY (no target: masked in the fusion loss, or in
                            `fusellm` mode replaced by the target model's own row, as the official collator does).
    """

    ids: np.ndarray
    logprobs: np.ndarray
    kind: np.ndarray

    def counts(self) -> np.ndarray:
        """int32[m] number of non-pad entries per row."""
        return np.isfinite(self.logprobs).sum(axis=1).astype(np.int32)


def empty_rows(m: int, k: int) -> SparseRows:
    return SparseRows(np.zeros((m, k), np.int32), np.full((m, k), -np.inf, np.float32), np.full(m, ROW_EMPTY, np.int8))


def _offset_rank_keys(byte_end: np.ndarray) -> np.ndarray:
    """byte_end int[n] (non-decreasing) → int64[n] strictly increasing keys (byte_end, rank among equal ends)."""
    n = len(byte_end)
    idx = np.arange(n)
    starts = np.ones(n, bool)
    starts[1:] = byte_end[1:] != byte_end[:-1]
    rank = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    return (byte_end.astype(np.int64) << 32) | rank


def matching_positions(src_byte_end: np.ndarray, tgt_byte_end: np.ndarray) -> np.ndarray:
    """src_byte_end int[n], tgt_byte_end int[m] → int32[m]: the source position whose row predicts from the same
    text as target row t (same end offset and rank among tokens ending there), else −1."""
    src_keys = _offset_rank_keys(np.asarray(src_byte_end))
    tgt_keys = _offset_rank_keys(np.asarray(tgt_byte_end))
    pos = np.searchsorted(src_keys, tgt_keys)
    found = pos < len(src_keys)
    found[found] = src_keys[pos[found]] == tgt_keys[found]
    return np.where(found, pos, -1).astype(np.int32)


def merge_rows(ids: np.ndarray, probs: np.ndarray, k_out: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int[r, k] (−1 = drop), probs float64[r, k] → (ids int32[r, k_out], logprobs float32[r, k_out]):
    probability summed per distinct id, renormalised, sorted descending; rows with no mass are all pads."""
    r, k = ids.shape
    valid = (ids >= 0) & (probs > 0)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    first = np.argmax(same, axis=2)
    is_first = valid & (first == np.arange(k))
    summed = np.where(is_first, np.einsum("rjl,rl->rj", same.astype(np.float64), probs), 0.0)
    total = summed.sum(axis=1, keepdims=True)
    order = np.argsort(-summed, axis=1, kind="stable")[:, :k_out]
    top = np.take_along_axis(summed, order, axis=1)
    out_ids = np.where(top > 0, np.take_along_axis(ids, order, axis=1), 0).astype(np.int32)
    with np.errstate(divide="ignore", invalid="ignore"):
        out_lp = np.where(top > 0, np.log(top / total), -np.inf).astype(np.float32)
    if out_ids.shape[1] < k_out:
        pad = k_out - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)))
        out_lp = np.pad(out_lp, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_ids, out_lp


def covering(table: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """A source → target table (a vocab map, −1 = dropped) extended with −1 up to the largest id in ``topk_ids``: a
    model whose embedding has more rows than its tokenizer has ids (MPT-7B: 50432 vs 50277) can put those rows in its
    top-k; their mass is dropped and the row renormalised over the rest (as in the online path,
    ``online.padded_vocab_map``). Returns ``table`` itself when it already covers every id."""
    top = int(topk_ids.max(initial=-1)) + 1
    if top <= len(table):
        return table
    return np.concatenate([table, np.full(top - len(table), -1, table.dtype)])


def with_next_token(src_ids: np.ndarray, src_topk_ids: np.ndarray, src_topk_logprobs: np.ndarray,
                    src_next_logprob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each source row's top-k with the text's next source token in it: where the top-k lacks that token, it takes the
    place of the last (least likely) candidate, with its own log-probability.

    src_ids int[n], src_topk_ids int[n, k], src_topk_logprobs float[n, k] (descending), src_next_logprob float[n]
    (log p(src_ids[s+1]) at row s; NaN where unknown, e.g. the last row) → (ids int32[n, k], logprobs float32[n, k])."""
    n, k = src_topk_ids.shape
    nxt = np.zeros(n, np.int64)
    nxt[:-1] = np.asarray(src_ids)[1:]
    lp = np.asarray(src_next_logprob, np.float64)
    add = np.isfinite(lp) & ~(src_topk_ids == nxt[:, None]).any(axis=1)
    add[-1:] = False
    ids = np.array(src_topk_ids, np.int32)
    lps = np.array(src_topk_logprobs, np.float32)
    ids[add, -1], lps[add, -1] = nxt[add], lp[add]
    return ids, lps


def tail_to_next(probs: np.ndarray, is_next: np.ndarray) -> np.ndarray:
    """probs float64[r, k] (a row's candidates, summing to ≤ 1), is_next bool[r, k] (the candidate that is the text's
    next token; at most one per row) → probs with the row's missing mass ``1 − Σ probs`` added to that candidate.

    A top-k row says nothing about where the rest of the teacher's mass goes; renormalising spreads it over the top-k
    in proportion (a weak teacher's top-10 then claims far more than it believes), while this keeps every candidate
    at the teacher's own probability and lets the text's own continuation take the rest, as the CLM label would."""
    rest = np.clip(1.0 - probs.sum(axis=1, keepdims=True), 0.0, 1.0)
    return probs + np.where(is_next, rest, 0.0)


def _next_tokens(src_ids, src_byte_end, s, tgt_ids, tgt_byte_end, t):
    """Source rows ``s`` matched to target rows ``t`` → (src_next, tgt_next, valid): the next token on each side, valid
    where both exist and both own bytes or both span none (an EOS stands only for an EOS)."""
    src_byte_end, tgt_byte_end = np.asarray(src_byte_end, np.int64), np.asarray(tgt_byte_end, np.int64)
    n, m = len(src_byte_end), len(tgt_byte_end)
    valid = (s + 1 < n) & (t + 1 < m)
    sn, tn = np.minimum(s + 1, n - 1), np.minimum(t + 1, m - 1)
    valid &= (src_byte_end[sn] > src_byte_end[s]) == (tgt_byte_end[tn] > tgt_byte_end[t])
    return np.asarray(src_ids)[sn], np.asarray(tgt_ids)[tn], valid


def _check_topk(src_topk_ids: np.ndarray, src_topk_logprobs: np.ndarray, n: int, vocab_map: np.ndarray) -> None:
    if src_topk_ids.ndim != 2 or src_topk_ids.shape != src_topk_logprobs.shape:
        raise ValueError(
            f"top-k ids and logprobs must both be [n, k]; got {src_topk_ids.shape} and {src_topk_logprobs.shape}"
        )
    if src_topk_ids.shape[0] != n:
        raise ValueError(f"top-k rows ({src_topk_ids.shape[0]}) must match the source tokens ({n}), one row per token")
    if src_topk_ids.size and (src_topk_ids.min() < 0 or src_topk_ids.max() >= len(vocab_map)):
        raise ValueError(
            f"top-k ids must lie in [0, {len(vocab_map)}) (the source vocab the map was built for); got "
            f"[{src_topk_ids.min()}, {src_topk_ids.max()}]: the teacher's model and tokenizer vocab sizes differ"
        )


def transfer_topk(
    src_byte_end: np.ndarray,
    tgt_byte_end: np.ndarray,
    tgt_ids: np.ndarray,
    src_topk_ids: np.ndarray,
    src_topk_logprobs: np.ndarray,
    vocab_map: np.ndarray,
    fallback: Fallback = "onehot_next",
    k_out: int | None = None,
    continuation: Continuation | None = None,
    src_ids: np.ndarray | None = None,
    in_context: bool = False,
    src_next_logprob: np.ndarray | None = None,
    tail: Tail = "renormalize",
) -> SparseRows:
    """Default-mode transfer (module docstring) → SparseRows with m rows of k_out (default k) entries.

    src_byte_end int[n], tgt_byte_end int[m], tgt_ids int[m]; src_topk_ids int[n, k], src_topk_logprobs float[n, k]
    (log-probabilities over the full source vocab, −inf pads allowed); vocab_map int32[V_src] (−1 = unmapped);
    continuation: the pair's tables for rows inside a source token; in_context: the text's next source token maps
    to the target's next token (module docstring); both need src_ids int[n] (the source's tokens); src_next_logprob
    float[n] (in_context): the teacher's log p(src_ids[s+1]) at row s, to add that candidate where the top-k lacks it;
    tail (in_context): the mass outside a matched row's candidates is renormalised away (``renormalize``) or given to
    the text's next token (``next_token``, :func:`tail_to_next`).
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    src_topk_ids = np.asarray(src_topk_ids)
    src_topk_logprobs = np.asarray(src_topk_logprobs)
    tgt_ids = np.asarray(tgt_ids)
    m = len(tgt_byte_end)
    if len(tgt_ids) != m:
        raise ValueError(f"target ids ({len(tgt_ids)}) and byte offsets ({m}) must have the same length")
    _check_topk(src_topk_ids, src_topk_logprobs, len(src_byte_end), vocab_map)
    k = src_topk_ids.shape[1]
    k_out = k if k_out is None else k_out
    rows = empty_rows(m, k_out)
    if (continuation is not None or in_context) and (src_ids is None or len(src_ids) != len(src_byte_end)):
        raise ValueError("continuation and in_context need src_ids, one per source token")
    if in_context and src_next_logprob is not None and len(src_ids):
        src_topk_ids, src_topk_logprobs = with_next_token(src_ids, src_topk_ids, src_topk_logprobs, src_next_logprob)
    pos = matching_positions(src_byte_end, tgt_byte_end)
    at = np.flatnonzero(pos >= 0)
    if at.size:
        mapped = vocab_map[src_topk_ids[pos[at]]]
        probs = np.exp(src_topk_logprobs[pos[at]].astype(np.float64))
        if in_context:
            src_next, tgt_next, valid = _next_tokens(src_ids, src_byte_end, pos[at], tgt_ids, tgt_byte_end, at)
            mapped = in_context_ids(mapped, src_topk_ids[pos[at]], src_next, tgt_next, valid)
            if tail == "next_token":
                probs = tail_to_next(probs, (src_topk_ids[pos[at]] == src_next[:, None]) & valid[:, None])
        ids, lp = merge_rows(mapped, probs, k_out)
        ok = np.isfinite(lp[:, 0])
        rows.ids[at[ok]], rows.logprobs[at[ok]], rows.kind[at[ok]] = ids[ok], lp[ok], ROW_TEACHER
    if continuation is not None:
        inner, mapped, probs = inner_rows(src_ids, src_byte_end, tgt_byte_end, src_topk_ids, src_topk_logprobs,
                                          continuation, tgt_ids if in_context else None)
        if inner.size:
            ids, lp = merge_rows(mapped, probs, k_out)
            ok = np.isfinite(lp[:, 0])
            rows.ids[inner[ok]], rows.logprobs[inner[ok]], rows.kind[inner[ok]] = ids[ok], lp[ok], ROW_TEACHER
    if fallback == "onehot_next":
        fill = np.flatnonzero(rows.kind[:-1] != ROW_TEACHER) if m else np.zeros(0, np.int64)
        rows.ids[fill, 0] = tgt_ids[fill + 1]
        rows.logprobs[fill, 0] = 0.0
        rows.kind[fill] = ROW_ONEHOT
    return rows
