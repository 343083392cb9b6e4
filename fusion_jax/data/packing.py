"""Packing plan: documents → fixed-length blocks, as a pure function of (document lengths, seq_len T, seed).

Epoch ``e`` concatenates the documents in the order ``np.random.default_rng([seed, e]).permutation(N)`` (each
document as its target tokens, EOS included when the run appends it) into one token stream and cuts it into blocks of
``T`` tokens; the last block of an epoch is padded (the official ``packing.py`` keeps the short remainder too).
Documents straddle block boundaries, as in the official pipeline: concatenate and cut.

Global block ``g`` is block ``g % blocks_per_epoch`` of epoch ``g // blocks_per_epoch``, so any block is found
directly — a searchsorted on the epoch's cumulative lengths, no state carried from block to block — and a batch is a
pure function of (seed, step).

A block is a list of *segments* ``(doc_index, token_start, token_end, offset)``: tokens ``[token_start, token_end)``
of document ``doc_index`` placed at ``[offset, offset + token_end − token_start)`` of the block. Segment ``j`` (in
block order) gets segment id ``j + 1`` (0 = padding), so with ``mask_documents=True`` nothing attends across
documents, also not across the two pieces of a straddling document, which sit in different blocks anyway.
``mask_documents=False`` is the official compatibility mode: the whole non-pad block is one segment (attention
across documents, separated only by EOS; positions continuous).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

import numpy as np

from fusion_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Segments:
    """The pieces of one block, in block order (all int64[S]): tokens ``[start, end)`` of document ``doc`` sit at
    ``[offset, offset + end − start)`` of the block. ``length`` = non-pad tokens in the block."""

    doc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    offset: np.ndarray

    @property
    def length(self) -> int:
        return int((self.end - self.start).sum())

    def __len__(self) -> int:
        return len(self.doc)


class PackingPlan:
    """Blocks of ``seq_len`` tokens over documents of ``lengths`` tokens (int[N], EOS already counted), reshuffled
    every epoch with ``seed``. Picklable; per-epoch orders are recomputed on demand (a small LRU)."""

    def __init__(self, lengths: np.ndarray, seq_len: int, seed: int, epoch_cache: int = 2):
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or (lengths.size and lengths.min() < 0):
            raise ValueError(f"lengths must be a 1-D array of non-negative token counts, got shape {lengths.shape}")
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.lengths = lengths.astype(np.int64)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.num_docs = len(self.lengths)
        self.tokens_per_epoch = int(self.lengths.sum())
        if self.tokens_per_epoch == 0:
            raise InputError(f"nothing to pack: the {self.num_docs} documents hold no tokens")
        self.blocks_per_epoch = -(-self.tokens_per_epoch // self.seq_len)
        self._epoch_cache = epoch_cache
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_epochs"] = OrderedDict()
        return state

    @property
    def fingerprint(self) -> str:
        """sha256 over (lengths, seq_len, seed): equal plans ↔ equal fingerprints."""
        h = hashlib.sha256(b"fusion_jax.packing.v1\0")
        h.update(np.asarray([self.seq_len, self.seed, self.num_docs], "<i8").tobytes())
        h.update(self.lengths.astype("<i8").tobytes())
        return h.hexdigest()

    def order(self, epoch: int) -> np.ndarray:
        """int64[N]: the documents of ``epoch`` in stream order."""
        return self._epoch(epoch)[0]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order int64[N], cum int64[N+1]): cum[i] = stream offset of the i-th document of the epoch."""
        hit = self._epochs.get(epoch)
        if hit is not None:
            self._epochs.move_to_end(epoch)
            return hit
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs).astype(np.int64)
        cum = np.zeros(self.num_docs + 1, np.int64)
        np.cumsum(self.lengths[order], out=cum[1:])
        self._epochs[epoch] = (order, cum)
        while len(self._epochs) > self._epoch_cache:
            self._epochs.popitem(last=False)
        return order, cum

    def locate(self, block: int) -> tuple[int, int]:
        """global block → (epoch, block within the epoch)."""
        if block < 0:
            raise IndexError(f"block must be non-negative, got {block}")
        return divmod(int(block), self.blocks_per_epoch)

    def segments(self, block: int) -> Segments:
        """The segments of global block ``block`` (module docstring). O(log N + S)."""
        epoch, b = self.locate(block)
        order, cum = self._epoch(epoch)
        lo = b * self.seq_len
        hi = min(lo + self.seq_len, self.tokens_per_epoch)
        # Documents i (in stream order) with cum[i] < hi and cum[i+1] > lo; empty documents are skipped.
        first = int(np.searchsorted(cum, lo, side="right")) - 1
        last = int(np.searchsorted(cum, hi, side="left"))  # exclusive
        idx = np.arange(first, last)
        idx = idx[cum[idx + 1] > cum[idx]]
        starts = np.maximum(cum[idx], lo)
        ends = np.minimum(cum[idx + 1], hi)
        return Segments(doc=order[idx], start=starts - cum[idx], end=ends - cum[idx], offset=starts - lo)


def block_layout(segments: Segments, seq_len: int, mask_documents: bool = True) -> dict[str, np.ndarray]:
    """The token-independent part of a block (all [T]): ``segment_ids int32`` (1.. per segment, 0 = pad; one segment
    for the whole block when ``mask_documents=False``), ``positions int32`` (restart at 0 in each segment; 0..T−1 in
    the official mode, 0 on padding), ``loss_mask bool`` (the next position is in the same non-pad segment),
    ``doc_index int32`` (−1 on padding), ``doc_pos int32`` (token index inside its document, 0 on padding)."""
    T = seq_len
    n = segments.length
    sizes = (segments.end - segments.start).astype(np.int64)
    seg = np.zeros(T, np.int32)
    seg[:n] = np.repeat(np.arange(1, len(sizes) + 1, dtype=np.int32), sizes)
    doc_index = np.full(T, -1, np.int32)
    doc_index[:n] = np.repeat(segments.doc, sizes)
    seg_first = np.repeat(segments.offset, sizes)
    within = np.arange(n, dtype=np.int64) - seg_first
    doc_pos = np.zeros(T, np.int32)
    doc_pos[:n] = np.repeat(segments.start, sizes) + within
    positions = np.zeros(T, np.int32)
    if mask_documents:
        positions[:n] = within
    else:
        seg[:n] = 1
        positions[:n] = np.arange(n)
    loss_mask = np.zeros(T, bool)
    loss_mask[:-1] = (seg[:-1] != 0) & (seg[:-1] == seg[1:])
    return {"segment_ids": seg, "positions": positions, "loss_mask": loss_mask, "doc_index": doc_index,
            "doc_pos": doc_pos}
