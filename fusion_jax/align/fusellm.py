"""The `fusellm` compatibility mode: the official ``others.py::transform_step_logits``, output for output.

For a base (target) document and a blending (source) document with the source's top-k per position:

1. DTW (``align.dtw``) over the raw vocabulary pieces with each tokenizer's prefix character *deleted* (``▁``/``Ġ``);
   the cost is the edit distance.
2. For base position i matched to exactly one blending position j, the pair is accepted when the blending piece with
   ``Ġ`` rewritten to ``▁`` equals the base piece (``hard``, EM), or — ``soft``, MinED — also when the MinED map sends
   it to the base piece. At i = 0 a byte-level blending piece gets ``▁`` prepended when the base piece starts with
   ``▁`` and it does not (SentencePiece's dummy prefix; the official "special case for mpt").
3. An accepted pair transfers row j: each candidate's piece is rewritten (``hard``: kept only if it is a base piece;
   ``soft``: sent through the MinED map), the first candidate per base id is kept (the largest value, nothing is
   summed), values stay as given. A ``hard`` row can come out empty (``ROW_EMPTY``; the official collator then uses
   the base model's own row).
4. Anything else (not accepted, or i matched to several blending positions) is a one-hot on the **current** base
   token ``ids[i]`` (official, ``onehot_target="current"``) or on the next one (FuseChat-v2's fix, ``"next"``: the
   label ``ids[i+1]``, and ``ids[-1]`` for the last position).

Strings are compared only through precomputed per-pair tables (:class:`FuseLLMPair`), so a document costs the DTW
plus O(m·k) array work.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fusion_jax.align.dtw import DtwAlignment, TieOrder, dtw
from fusion_jax.align.transfer import (
    ROW_EMPTY,
    ROW_ONEHOT,
    ROW_TEACHER,
    SparseRows,
    _check_topk,
    covering,
    empty_rows,
)
from fusion_jax.align.vocab import prefix_char
from fusion_jax.tokenizers import Tokenizer

VocabAlign = Literal["hard", "soft"]
VOCAB_ALIGNS: tuple[str, ...] = ("hard", "soft")
OnehotTarget = Literal["current", "next"]
ONEHOT_TARGETS: tuple[str, ...] = ("current", "next")


def dtw_tokens(tok: Tokenizer, ids: np.ndarray) -> list[str]:
    """The strings the official DTW compares: raw pieces with the tokenizer's prefix character deleted."""
    char = prefix_char(tok)
    return [tok.pieces[i].replace(char, "") for i in np.asarray(ids).tolist()]


class FuseLLMPair:
    """Per (blending = source, base = target) tokenizer pair tables, built once, reused for every document.

    hard_map int32[V_src]: base id of the rewritten blending piece, −1 if it is not a base piece (EM).
    soft_map int32[V_src]: base id the MinED map sends the rewritten piece to (needs ``mined``, the
                           ``vocab.mined_map`` of this pair).
    """

    def __init__(self, src: Tokenizer, tgt: Tokenizer, mined: np.ndarray | None = None):
        self.src, self.tgt = src, tgt
        self.src_char, self.tgt_char = prefix_char(src), prefix_char(tgt)
        # `base_model_vocab` = get_vocab(): piece → id (a piece listed under several ids maps to the last one).
        self.tgt_vocab = {p: i for i, p in enumerate(tgt.pieces) if p}
        self.rewritten = [p.replace(self.src_char, self.tgt_char) for p in src.pieces]
        self.hard_map = np.array([self.tgt_vocab.get(s, -1) for s in self.rewritten], np.int32)
        self.soft_map = None
        if mined is not None:
            mined = np.asarray(mined)
            if mined.shape != (src.vocab_size,) or mined.min(initial=0) < 0 or mined.max(initial=0) >= tgt.vocab_size:
                raise ValueError(
                    f"the MinED map must be int32[{src.vocab_size}] with ids in [0, {tgt.vocab_size}); got "
                    f"{mined.dtype}{list(mined.shape)}: build it with vocab_map(src, tgt, 'mined') for this pair"
                )
            self.soft_map = np.array([self.tgt_vocab.get(tgt.pieces[j], -1) for j in mined.tolist()], np.int32)
            # The official mapping is keyed by rewritten piece; only position 0 (the `▁` hack) can ask for a key
            # that is not some source token's rewritten piece.
            self._mined_by_string = {s: tgt.pieces[j] for s, j in zip(self.rewritten, mined.tolist())}

    def align(self, src_ids: np.ndarray, tgt_ids: np.ndarray, tie_order: TieOrder = "official") -> DtwAlignment:
        """The official ``dtw(blending_tokens, base_tokens)`` for one document."""
        return dtw(dtw_tokens(self.src, src_ids), dtw_tokens(self.tgt, tgt_ids), tie_order)

    def _accepted(self, i: int, src_id: int, tgt_id: int, vocab_align: str) -> bool:
        base_token = self.tgt.pieces[tgt_id]
        blending_token = self.rewritten[src_id]
        if (
            i == 0 and self.src.kind == "byte_level" and base_token.startswith(self.tgt_char)
            and not blending_token.startswith(self.tgt_char)
        ):
            blending_token = self.tgt_char + blending_token
        if base_token == blending_token:
            return True
        if vocab_align == "hard":
            return False
        # `blending_token in mapping and mapping[blending_token] == base_token`
        return self._mined_by_string.get(blending_token) == base_token

    def transfer(
        self,
        src_ids: np.ndarray,
        tgt_ids: np.ndarray,
        src_topk_ids: np.ndarray,
        src_topk_values: np.ndarray,
        vocab_align: VocabAlign = "hard",
        onehot_target: OnehotTarget = "current",
        tie_order: TieOrder = "official",
        alignment: DtwAlignment | None = None,
        k_out: int | None = None,
        drop_beyond_vocab: bool = False,
    ) -> SparseRows:
        """src_ids int[n], tgt_ids int[m] (EOS included, as the official pipeline feeds them), src_topk_ids int[n, k],
        src_topk_values float[n, k] (logits or log-probs, descending) → SparseRows with m rows of k_out (default k)
        entries: the first k_out kept candidates of each row.

        drop_beyond_vocab: top-k ids ≥ the source tokenizer's size (a model with more embedding rows than tokenizer
        ids, MPT-7B) are dropped like unmapped candidates (:func:`~fusion_jax.align.transfer.covering`, as the
        ``bytes`` path does; the row's softmax then renormalises over what is kept); without it they are an error."""
        if vocab_align not in VOCAB_ALIGNS:
            raise ValueError(f"vocab_align must be one of {VOCAB_ALIGNS}, got {vocab_align!r}")
        if onehot_target not in ONEHOT_TARGETS:
            raise ValueError(f"onehot_target must be one of {ONEHOT_TARGETS}, got {onehot_target!r}")
        if vocab_align == "soft" and self.soft_map is None:
            raise ValueError("vocab_align='soft' needs the MinED map: FuseLLMPair(src, tgt, mined=vocab_map(..., 'mined'))")
        src_ids, tgt_ids = np.asarray(src_ids), np.asarray(tgt_ids)
        src_topk_ids, src_topk_values = np.asarray(src_topk_ids), np.asarray(src_topk_values)
        hard_map, soft_map = self.hard_map, self.soft_map
        if drop_beyond_vocab:
            hard_map = covering(hard_map, src_topk_ids)
            soft_map = None if soft_map is None else covering(soft_map, src_topk_ids)
        _check_topk(src_topk_ids, src_topk_values, len(src_ids), hard_map)
        m, k = len(tgt_ids), src_topk_ids.shape[1]
        if alignment is None:
            alignment = self.align(src_ids, tgt_ids, tie_order)
        first, count = alignment.tgt_spans(m)

        accepted = np.zeros(m, bool)
        for i in np.flatnonzero(count == 1).tolist():
            accepted[i] = self._accepted(i, int(src_ids[first[i]]), int(tgt_ids[i]), vocab_align)

        k_out = k if k_out is None else k_out
        rows = empty_rows(m, k_out)
        at = np.flatnonzero(accepted)
        if at.size:
            table = hard_map if vocab_align == "hard" else soft_map
            cand = table[src_topk_ids[first[at]]]                              # [r, k], −1 = dropped
            valid = (cand >= 0) & (src_topk_values[first[at]] > -np.inf)       # −inf values are pads
            same_before = (cand[:, :, None] == cand[:, None, :]) & valid[:, None, :]
            same_before &= np.tri(k, k, -1, dtype=bool)[None]                  # l < j
            keep = valid & ~same_before.any(axis=2)                            # first occurrence per id
            order = np.argsort(~keep, axis=1, kind="stable")                   # kept entries first, in order
            kept = np.take_along_axis(keep, order, axis=1)
            ids = np.where(kept, np.take_along_axis(cand, order, axis=1), 0)
            vals = np.where(kept, np.take_along_axis(src_topk_values[first[at]].astype(np.float32), order, axis=1),
                            -np.inf)
            w = min(k, k_out)
            rows.ids[at, :w], rows.logprobs[at, :w] = ids[:, :w], vals[:, :w]
            rows.kind[at] = np.where(kept[:, 0], ROW_TEACHER, ROW_EMPTY)
        hot = np.flatnonzero(~accepted)
        target = tgt_ids if onehot_target == "current" else np.append(tgt_ids[1:], tgt_ids[-1:])
        rows.ids[hot, 0] = target[hot]
        rows.logprobs[hot, 0] = 0.0
        rows.kind[hot] = ROW_ONEHOT
        return rows
