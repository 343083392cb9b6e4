"""An online teacher's part of a block: the source tokens of the block's document pieces and the alignment table.

An online teacher (``TeacherConfig.mode == 'online'``) has no cache: its forward runs inside the train step
(``fusion_jax/fusion/online.py``), so the loader ships its inputs instead of rows. Per document the teacher's
encoding and, per target token, the source token whose row predicts from the same text (:func:`encode_online`);
per block the source block, one segment per document piece (:class:`OnlineBlock`; the arrays and how a piece's
source tokens are chosen: ``fusion_jax/data/loader.py``'s module docstring).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fusion_jax.align.transfer import matching_positions
from fusion_jax.data.teachers import TeacherReader


@dataclasses.dataclass(frozen=True)
class DocOnline:
    """An online teacher's encoding of one document (EOS appended when configured)."""

    ids: np.ndarray         # int32[n]
    byte_start: np.ndarray  # int64[n]
    byte_end: np.ndarray    # int64[n]
    match: np.ndarray       # int32[m]: per target token, the source token whose row predicts from the same text, −1


def encode_online(t: TeacherReader, text: str, tgt_byte_end: np.ndarray, append_eos: bool) -> DocOnline:
    """The online teacher ``t``'s encoding of ``text`` matched to the target's token ends ``tgt_byte_end`` (int32[m])."""
    tok = t.tokenizer
    # with append_eos, as capture does: the source's own EOS, an empty span at the end of the text
    enc = tok.encode(text, eos=append_eos)
    ids, ends = np.asarray(enc.ids, np.int32), np.asarray(enc.byte_end, np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return DocOnline(ids, starts, ends, matching_positions(ends, tgt_byte_end))


class OnlineBlock:
    """One online teacher's part of a block under construction (``Ts`` source positions, ``T`` target positions)."""

    def __init__(self, Ts: int, T: int):
        self.tokens = np.zeros(Ts, np.int32)
        self.segment_ids = np.zeros(Ts, np.int32)
        self.positions = np.zeros(Ts, np.int32)
        self.token_bytes = np.zeros(Ts, np.int32)
        self.gather = np.full(T, -1, np.int32)
        self.next_ids = np.full(T, -1, np.int32)
        self.used = 0
        self.overflow = 0

    def add(self, dt: DocOnline, tgt_ids: np.ndarray, s: int, e: int, o: int, lo: int, hi: int, last: bool,
            segment: int) -> None:
        """Target tokens [s, e) of a document (bytes [lo, hi), ``last``: the document's last piece) at offset o."""
        nxt = np.full(e - s, -1, np.int32)
        has = np.arange(s, e) + 1 < len(tgt_ids)
        nxt[has] = tgt_ids[np.arange(s, e)[has] + 1]
        self.next_ids[o:o + e - s] = nxt
        # the source tokens whose span lies inside the piece (contiguous: spans are monotone); an empty span at hi
        # (EOS) belongs to the document's last piece only; a token crossing lo is dropped
        inside = (dt.byte_start >= lo) & (dt.byte_end <= hi) & ((dt.byte_start < hi) | last)
        idx = np.flatnonzero(inside)
        if not idx.size:
            return
        a, n = int(idx[0]), int(idx.size)
        Ts = len(self.tokens)
        placed = max(0, min(n, Ts - self.used))
        self.overflow += n - placed
        if placed:
            at = slice(self.used, self.used + placed)
            self.tokens[at] = dt.ids[a:a + placed]
            self.segment_ids[at] = segment
            self.positions[at] = np.arange(placed)
            self.token_bytes[at] = (dt.byte_end - dt.byte_start)[a:a + placed]
        p = dt.match[s:e].astype(np.int64)
        ok = (p >= a) & (p < a + placed)
        self.gather[o:o + e - s] = np.where(ok, self.used + p - a, -1)
        self.used += placed

    def arrays(self) -> dict[str, np.ndarray]:
        return {"src_tokens": self.tokens, "src_segment_ids": self.segment_ids, "src_positions": self.positions,
                "src_token_bytes": self.token_bytes, "gather": self.gather, "next_ids": self.next_ids,
                "src_overflow": np.int32(self.overflow)}
