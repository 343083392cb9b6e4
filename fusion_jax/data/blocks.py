"""Packed blocks: global block index → fixed-shape numpy arrays with every teacher's rows on the target positions.

Per segment of a block (``PackingPlan.segments``) the :class:`BlockBuilder` encodes the document with the target
tokenizer, reads each teacher's record of that document from its cache, transfers the teacher's rows onto the
target positions of the *whole document* and slices the segment's rows (an online teacher: its source tokens and
alignment table, :mod:`fusion_jax.data.online_block`). Recently used documents are kept in a small LRU, since
documents straddle blocks. The arrays of one block are those of ``fusion_jax/data/loader.py``'s module docstring
without the batch dimension; :func:`stack` gives them one.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from fusion_jax.align.chunks import byte_chunks
from fusion_jax.align.transfer import ROW_EMPTY, SparseRows
from fusion_jax.data.online_block import DocOnline, OnlineBlock, encode_online
from fusion_jax.data.packing import PackingPlan, block_layout
from fusion_jax.data.teachers import LoaderError, TeacherReader
from fusion_jax.tokenizers import load_tokenizer


@dataclasses.dataclass(frozen=True)
class DocTeacher:
    """A cached teacher's rows of one document on the target positions, and its CE per predicted token."""

    rows: SparseRows
    doc_ce: float
    span_start: np.ndarray  # int64[n−1]: byte span of the teacher's predicted tokens 1..n−1
    span_end: np.ndarray
    ce: np.ndarray          # float64[n−1]: −log p(token j | tokens < j)
    chunk_first: np.ndarray  # int32[c]: first target token of each byte chunk (align.chunks)
    chunk_last: np.ndarray   # int32[c]: its last target token
    chunk_logprob: np.ndarray  # float64[c]: the teacher's log-probability of the chunk


@dataclasses.dataclass(frozen=True)
class Doc:
    """One document as the blocks use it: its target encoding and every teacher's part, in config order."""

    ids: np.ndarray         # int32[m], EOS included when appended
    byte_end: np.ndarray    # int32[m]
    byte_start: np.ndarray  # int32[m]
    teachers: tuple[DocTeacher | DocOnline, ...]


class BlockBuilder:
    """Global block index → a dict of fixed-shape numpy arrays (module docstring, without the batch dimension).

    Picklable: the target tokenizer is loaded lazily from ``target_path`` in each process; documents and caches
    reopen their files lazily.
    """

    def __init__(self, plan: PackingPlan, store, target_path: str, teachers: Sequence[TeacherReader], k: int,
                 append_eos: bool, mask_documents: bool, doc_cache: int = 32, target=None):
        self.plan, self.store, self.target_path = plan, store, str(target_path)
        self.teachers = list(teachers)
        self.k, self.append_eos, self.mask_documents = int(k), bool(append_eos), bool(mask_documents)
        self.doc_cache = int(doc_cache)
        self._target = target
        self._docs: OrderedDict[int, Doc] = OrderedDict()
        self._lock = threading.RLock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_target=None, _docs=OrderedDict(), _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def target(self):
        if self._target is None:
            self._target = load_tokenizer(self.target_path)
        return self._target

    @property
    def seq_len(self) -> int:
        return self.plan.seq_len

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The target tokens of one document, EOS appended when configured → (ids int32[m], byte_end int32[m])."""
        enc = self.target.encode(text, eos=self.append_eos)
        return enc.ids, enc.byte_end

    def document(self, d: int) -> Doc:
        """Document ``d``: target encoding and every teacher's rows on the target positions (LRU-cached)."""
        hit = self._docs.get(d)
        if hit is not None:
            self._docs.move_to_end(d)
            return hit
        doc = self.store[d]
        ids, byte_end = self.encode(doc.text)
        if len(ids) != self.plan.lengths[d]:
            raise LoaderError(
                f"document {d} ({doc.id!r}) has {len(ids)} target tokens but the packing plan counted "
                f"{self.plan.lengths[d]}: the document lengths cache is stale; delete it and start again"
            )
        num_bytes = len(doc.text.encode("utf-8"))
        byte_start = np.concatenate([[0], byte_end[:-1]]).astype(np.int32) if len(ids) else byte_end
        teachers = []
        for t in self.teachers:
            if t.online:
                teachers.append(encode_online(t, doc.text, byte_end, self.append_eos))
                continue
            rec = t.read(d, doc, num_bytes)
            rows = t.transfer(rec, ids, byte_end, self.k, self.target)
            ends = rec.byte_end.astype(np.int64)
            starts = np.concatenate([[0], ends[:-1]])
            teachers.append(DocTeacher(rows, float(rec.doc_ce), starts[1:], ends[1:],
                                       rec.token_ce[:-1].astype(np.float64),
                                       *byte_chunks(rec.byte_end, rec.token_ce, byte_end)))
        out = Doc(ids, byte_end, byte_start, tuple(teachers))
        if self.doc_cache:
            self._docs[d] = out
            while len(self._docs) > self.doc_cache:
                self._docs.popitem(last=False)
        return out

    def __call__(self, block: int) -> dict[str, Any]:
        with self._lock:
            return self._build(int(block))

    def _build(self, block: int) -> dict[str, Any]:
        T, k = self.seq_len, self.k
        segs = self.plan.segments(block)
        lay = block_layout(segs, T, self.mask_documents)
        tokens = np.zeros(T, np.int32)
        token_bytes = np.zeros(T, np.int32)
        K = len(self.teachers)
        t_ids = [np.zeros((T, k), np.int32) for _ in range(K)]
        t_lp = [np.full((T, k), -np.inf, np.float32) for _ in range(K)]
        t_kind = [np.full(T, ROW_EMPTY, np.int8) for _ in range(K)]
        c_start = [np.full(T, -1, np.int32) for _ in range(K)]
        c_lp = [np.zeros(T, np.float32) for _ in range(K)]
        ce_sum = np.zeros(K)
        nats, nbytes = np.zeros(K), np.zeros(K, np.int64)
        online = {j: OnlineBlock(t.spec.source_len(T), T) for j, t in enumerate(self.teachers) if t.online}
        for i, (d, s, e, o) in enumerate(zip(segs.doc.tolist(), segs.start.tolist(), segs.end.tolist(),
                                             segs.offset.tolist())):
            doc = self.document(d)
            src, dst = slice(s, e), slice(o, o + e - s)
            tokens[dst] = doc.ids[src]
            token_bytes[dst] = doc.byte_end[src] - doc.byte_start[src]
            lo, hi, last = int(doc.byte_start[s]), int(doc.byte_end[e - 1]), e == len(doc.ids)
            for j, dt in enumerate(doc.teachers):
                if j in online:
                    online[j].add(dt, doc.ids, s, e, o, lo, hi, last, i + 1)
                    continue
                t_ids[j][dst] = dt.rows.ids[src]
                t_lp[j][dst] = dt.rows.logprobs[src]
                t_kind[j][dst] = dt.rows.kind[src]
                # chunks whose tokens are all predicted inside this piece: token i sits at o + i − s, predicted at
                # the position before it
                inside = (dt.chunk_first > s) & (dt.chunk_last < e)
                c_start[j][o - s - 1 + dt.chunk_last[inside]] = o - s - 1 + dt.chunk_first[inside]
                c_lp[j][o - s - 1 + dt.chunk_last[inside]] = dt.chunk_logprob[inside]
                ce_sum[j] += dt.doc_ce * (e - s)
                # the teacher's predicted tokens whose span lies in this piece's text; an empty span at the piece's
                # end (EOS) belongs to the document's last piece only, so no token is counted twice
                inside = (dt.span_start >= lo) & (dt.span_end <= hi) & ((dt.span_start < hi) | last)
                nats[j] += dt.ce[inside].sum()
                nbytes[j] += int((dt.span_end - dt.span_start)[inside].sum())
        n = segs.length
        teachers = []
        for j in range(K):
            if j in online:
                teachers.append(online[j].arrays())
                continue
            bpb = nats[j] / (math.log(2) * nbytes[j]) if nbytes[j] else np.nan
            teachers.append({"ids": t_ids[j], "logprobs": t_lp[j], "kind": t_kind[j],
                             "seq_ce": np.float32(ce_sum[j] / n), "seq_bpb": np.float32(bpb),
                             "chunk_start": c_start[j], "chunk_logprob": c_lp[j]})
        return {"tokens": tokens, "segment_ids": lay["segment_ids"], "positions": lay["positions"],
                "loss_mask": lay["loss_mask"], "doc_index": lay["doc_index"], "token_bytes": token_bytes,
                "teachers": teachers}

    def batch(self, blocks: Sequence[int]) -> dict[str, Any]:
        """Stack the given blocks → the batch dict with a leading dimension len(blocks)."""
        return stack([self(g) for g in blocks])


def stack(blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Blocks (nested dicts/lists of arrays, one structure) → the same structure of arrays stacked on a new axis 0."""
    def rec(items):
        first = items[0]
        if isinstance(first, dict):
            return {key: rec([it[key] for it in items]) for key in first}
        if isinstance(first, (list, tuple)):
            return [rec([it[i] for it in items]) for i in range(len(first))]
        return np.stack(items)

    return rec(list(blocks))
