"""The fusion data loader: packed target blocks with every teacher's top-k transferred onto the target positions.

Pipeline:

1. Target lengths: every document of the store is tokenized once with the target tokenizer (EOS appended when
   ``append_eos``); the counts are cached as ``<cache_dir>/doc_lengths/<key>.npy``, keyed by the store split's and
   the target tokenizer's fingerprints (:func:`target_lengths`).
2. Plan: :class:`~fusion_jax.data.packing.PackingPlan` over those lengths: global block ``g`` is a pure function of
   (lengths, seq_len, seed, g). Global batch ``s`` is blocks ``[s·B, (s+1)·B)``.
3. Blocks: :class:`BlockBuilder` (picklable, runs in grain workers) turns block ``g`` into fixed-shape numpy arrays.
   Per segment it encodes the document with the target tokenizer, reads each teacher's record of that document
   from its cache, transfers the teacher's rows onto the target positions of the *whole document* (``bytes``:
   :func:`~fusion_jax.align.transfer.transfer_topk`; ``fusellm``: :meth:`FuseLLMPair.transfer`) and slices the
   segment's rows. Recently used documents are kept in a small LRU, since documents straddle blocks.
4. Batches: each process builds only its rows of every global batch (the rows its devices hold under the ``batch``
   logical axis; ``[p·B/P, (p+1)·B/P)`` on a usual mesh) with grain (``worker_count`` processes, or in-process),
   then :func:`jax.make_array_from_process_local_data` assembles global ``jax.Array``s.

A batch (leading dimension B = global batch size; numpy per host, ``jax.Array`` globally)::

    tokens       int32[B, T]     target tokens (0 on padding)
    segment_ids  int32[B, T]     1, 2, … per document piece, 0 = padding (one segment per block when
                                 mask_documents=False, the official mode)
    positions    int32[B, T]     position in the segment (0..T−1 in the official mode)
    loss_mask    bool[B, T]      the position has a next-token label in the same segment
    doc_index    int32[B, T]     document of the position in the store split, −1 on padding
    token_bytes  int32[B, T]     UTF-8 bytes of each target token (0 for EOS and padding), for bits per byte
    teachers     list, one dict per teacher, in config order:
        ids       int32[B, T, k]     target ids, best first (pads: 0)
        logprobs  float32[B, T, k]   log-weights (−inf pads)
        kind      int8[B, T]         ROW_TEACHER | ROW_ONEHOT | ROW_EMPTY (padding: ROW_EMPTY)
        seq_ce    float32[B]         official block score: token-weighted mean over the block's non-pad positions of
                                     their document's ``doc_ce`` (the teacher's CE on its own tokens)
        seq_bpb   float32[B]         the teacher's CE summed over its tokens whose span lies inside the block's text
                                     (and that it predicted: not its first token of a document), over ln 2 × those
                                     tokens' bytes; NaN when the block holds no such byte
      an *online* teacher (``TeacherConfig.mode == 'online'``: no cache, its forward runs inside the train step,
      ``fusion_jax/online.py``) ships its inputs and the alignment table instead of rows (Ts = its ``seq_len``):
        src_tokens       int32[B, Ts]    the source tokens of the block's document pieces, one segment per piece
        src_segment_ids  int32[B, Ts]    1, 2, … (the piece's target segment id), 0 = padding
        src_positions    int32[B, Ts]    position in the segment
        src_token_bytes  int32[B, Ts]    UTF-8 bytes of each source token (0 for EOS and padding)
        gather           int32[B, T]     for target position t the source-block position whose row predicts from
                                         the same text (same byte end and rank, ``matching_positions`` on the
                                         whole document), −1 if none (→ fallback)
        next_ids         int32[B, T]     the target's next token in the same document (−1: none), for the
                                         ``onehot_next`` fallback — as the cached transfer uses it
        src_overflow     int32[B]        source tokens of the block that did not fit in Ts (their target rows
                                         fall back); raise the teacher's seq_len when this is not 0

    Per piece (document d, target tokens [a, e) covering bytes [lo, hi)), the online source block holds the source
    tokens of d (+EOS as the caches have it, in the document's last piece) whose byte span lies inside [lo, hi]; a
    source token crossing ``lo`` is dropped (its bytes belong to the previous piece too), so the source's context in
    a piece that starts mid-document can begin a few bytes after the target's. Pieces that start at the document's
    start see exactly the context the cache sees. The source block always has one segment per piece, also with
    ``mask_documents=False``.

Resuming: ``loader.state()`` is a small dict of plain values (the next step plus what the batches depend on);
``FusionLoader(..., state=s)`` or ``loader.restore(s)`` continues with exactly the batches the saved run would have
seen. With ``worker_count > 0`` grain starts worker processes that re-import the main module (guard scripts with
``if __name__ == "__main__"``); absl flags are marked parsed if nobody parsed them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fusion_jax.align.transfer import ROW_EMPTY, SparseRows, covering, transfer_topk
from fusion_jax.config.schema import LoaderConfig, TeacherConfig
from fusion_jax.data.packing import PackingPlan, block_layout
from fusion_jax.data.teacher_cache import CacheError, TeacherCache
from fusion_jax.errors import InputError
from fusion_jax.files import atomic_path

log = logging.getLogger(__name__)

_LENGTHS_VERSION = 1
_STEPS_AHEAD = 1 << 40  # the grain range is "infinite"


class LoaderError(InputError):
    """A loader that cannot be built or a batch that cannot be made; the message names the teacher and field."""


# ------------------------------------------------------------------------------------------------ document lengths


def _cache_root(cache_dir: str | Path | None) -> Path:
    from fusion_jax.align.vocab import default_cache_dir

    return default_cache_dir() if cache_dir is None else Path(cache_dir)


def _count_tokens(tokenizer, texts) -> list[int]:
    return [len(tokenizer.encode(t).ids) for t in texts]


def _pool_state(store, tokenizer_path: str) -> tuple[Any, Any]:
    from fusion_jax.tokenizers import load_tokenizer

    return store, load_tokenizer(tokenizer_path)


def _pool_count(state: tuple[Any, Any], span: tuple[int, int]) -> np.ndarray:
    store, tok = state
    docs = store.__getitems__(range(*span)) if hasattr(store, "__getitems__") else [store[i] for i in range(*span)]
    return np.asarray(_count_tokens(tok, (d.text for d in docs)), np.int64)


def target_lengths(store, tokenizer, tokenizer_path: str | Path | None = None, cache_dir: str | Path | None = None,
                   workers: int = 0, progress: bool = True, chunk: int = 2048) -> np.ndarray:
    """int64[N]: target tokens of every document of ``store`` (EOS *not* counted), cached by fingerprints.

    The file is ``<cache_dir>/doc_lengths/<sha256(store fingerprint, split, tokenizer fingerprint)[:32]>.npy``.
    ``workers > 0`` (and ``tokenizer_path``) tokenizes in that many spawned processes (for MiniPile-size stores).
    """
    key = hashlib.sha256(
        f"fusion_jax.doc_lengths.v{_LENGTHS_VERSION}\0{store.fingerprint}\0{getattr(store, 'split', '')}\0"
        f"{tokenizer.fingerprint}".encode()
    ).hexdigest()[:32]
    path = _cache_root(cache_dir) / "doc_lengths" / f"{key}.npy"
    n = len(store)
    if path.is_file():
        try:
            lengths = np.load(path, allow_pickle=False)
            if lengths.shape == (n,) and lengths.dtype == np.int64 and (lengths >= 0).all():
                return lengths
            log.warning("document lengths cache %s holds %s%s, expected int64[%d]; recounting", path,
                        lengths.dtype, list(lengths.shape), n)
        except (OSError, ValueError) as e:
            log.warning("document lengths cache %s is unreadable (%s); recounting", path, e)
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    bar = _progress(total=n, desc=f"target tokens ({tokenizer.name})", disable=not progress)
    parts = []
    try:
        if workers > 0 and tokenizer_path is not None and len(spans) > 1:
            from fusion_jax.workers import spawn_map

            for (s, e), part in spawn_map(_pool_count, spans, workers, _pool_state, store, str(tokenizer_path)):
                parts.append(part)
                bar.update(e - s)
        else:
            it = iter(store)
            for s, e in spans:
                texts = [next(it).text for _ in range(s, e)]
                parts.append(np.asarray(_count_tokens(tokenizer, texts), np.int64))
                bar.update(e - s)
    finally:
        bar.close()
    lengths = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, lengths)
    return lengths


def _progress(total: int, desc: str, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the toolkit's dependencies
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc=desc, unit="doc", disable=disable)


# ------------------------------------------------------------------------------------------------ teachers


class _Teacher:
    """A teacher at run time: its opened cache and the tables its transfer needs. Picklable (the tokenizers and the
    FuseLLM pair tables are rebuilt lazily in each worker)."""

    def __init__(self, spec: TeacherConfig, cache: TeacherCache | None, tokenizer_path: str, target_path: str,
                 table: np.ndarray | None, tokenizer=None):
        self.spec, self.name, self.cache = spec, spec.label, cache  # cache None: an online teacher
        self.tokenizer_path, self.target_path = tokenizer_path, target_path
        self.table = table  # bytes: the vocab map; fusellm soft: the MinED map; fusellm hard: None
        self._pair = None
        self._tokenizer = tokenizer

    @property
    def online(self) -> bool:
        return self.spec.online

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from fusion_jax.tokenizers import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pair"] = None
        state["_tokenizer"] = None
        return state

    def pair(self, target):
        if self._pair is None:
            from fusion_jax.align.fusellm import FuseLLMPair
            from fusion_jax.tokenizers import load_tokenizer

            self._pair = FuseLLMPair(load_tokenizer(self.tokenizer_path), target, mined=self.table)
        return self._pair

    def transfer(self, rec, tgt_ids: np.ndarray, tgt_byte_end: np.ndarray, k: int, target) -> SparseRows:
        s = self.spec
        if s.align == "bytes":
            return transfer_topk(rec.byte_end, tgt_byte_end, tgt_ids, rec.topk_ids, rec.topk_logprobs,
                                 covering(self.table, rec.topk_ids), fallback=s.fallback, k_out=k)
        return self.pair(target).transfer(rec.ids, tgt_ids, rec.topk_ids[:, :k], rec.topk_logprobs[:, :k],
                                          vocab_align=s.vocab_align, onehot_target=s.onehot_target,
                                          tie_order=s.tie_order, drop_beyond_vocab=True)


@dataclasses.dataclass(frozen=True)
class _DocTeacher:
    rows: SparseRows
    doc_ce: float
    span_start: np.ndarray  # int64[n−1]: byte span of the teacher's predicted tokens 1..n−1
    span_end: np.ndarray
    ce: np.ndarray          # float64[n−1]: −log p(token j | tokens < j)


@dataclasses.dataclass(frozen=True)
class _DocOnline:
    """An online teacher's encoding of one document (EOS appended when configured)."""

    ids: np.ndarray         # int32[n]
    byte_start: np.ndarray  # int64[n]
    byte_end: np.ndarray    # int64[n]
    match: np.ndarray       # int32[m]: per target token, the source token whose row predicts from the same text, −1


@dataclasses.dataclass(frozen=True)
class _Doc:
    ids: np.ndarray         # int32[m], EOS included when appended
    byte_end: np.ndarray    # int32[m]
    byte_start: np.ndarray  # int32[m]
    teachers: tuple[_DocTeacher | _DocOnline, ...]


class BlockBuilder:
    """Global block index → a dict of fixed-shape numpy arrays (module docstring, without the batch dimension).

    Picklable: the target tokenizer is loaded lazily from ``target_path`` in each process; documents and caches
    reopen their files lazily.
    """

    def __init__(self, plan: PackingPlan, store, target_path: str, teachers: Sequence[_Teacher], k: int,
                 append_eos: bool, mask_documents: bool, doc_cache: int = 32, target=None):
        self.plan, self.store, self.target_path = plan, store, str(target_path)
        self.teachers = list(teachers)
        self.k, self.append_eos, self.mask_documents = int(k), bool(append_eos), bool(mask_documents)
        self.doc_cache = int(doc_cache)
        self._target = target
        self._docs: OrderedDict[int, _Doc] = OrderedDict()
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
            from fusion_jax.tokenizers import load_tokenizer

            self._target = load_tokenizer(self.target_path)
        return self._target

    @property
    def seq_len(self) -> int:
        return self.plan.seq_len

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The target tokens of one document, EOS appended when configured → (ids int32[m], byte_end int32[m])."""
        enc = self.target.encode(text, eos=self.append_eos)
        return enc.ids, enc.byte_end

    def document(self, d: int) -> _Doc:
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
                teachers.append(self._online_doc(t, doc.text, byte_end))
                continue
            try:
                rec = t.cache[d]
            except (CacheError, RuntimeError) as e:  # RuntimeError: ArrayRecord's chunk hash caught a corrupted read
                raise LoaderError(
                    f"teacher {t.name}: cannot read document {d} from the cache {t.cache.path}: {e}; check it with "
                    "verify=full and capture the damaged shard again"
                ) from e
            if rec.doc_id != doc.id:
                raise LoaderError(
                    f"teacher {t.name}: cache record {d} is document {rec.doc_id!r} but the document store has "
                    f"{doc.id!r} there: the cache ({t.cache.path}) was captured from other documents; capture again "
                    "from this store"
                )
            if rec.num_bytes != num_bytes:
                raise LoaderError(
                    f"teacher {t.name}: cache record {d} ({doc.id!r}) covers {rec.num_bytes} bytes but the document "
                    f"has {num_bytes}: the cache ({t.cache.path}) was captured from other text; capture again"
                )
            rows = t.transfer(rec, ids, byte_end, self.k, self.target if t.spec.align == "fusellm" else None)
            ends = rec.byte_end.astype(np.int64)
            starts = np.concatenate([[0], ends[:-1]])
            teachers.append(_DocTeacher(rows, float(rec.doc_ce), starts[1:], ends[1:],
                                        rec.token_ce[:-1].astype(np.float64)))
        out = _Doc(ids, byte_end, byte_start, tuple(teachers))
        if self.doc_cache:
            self._docs[d] = out
            while len(self._docs) > self.doc_cache:
                self._docs.popitem(last=False)
        return out

    def _online_doc(self, t: _Teacher, text: str, tgt_byte_end: np.ndarray) -> _DocOnline:
        from fusion_jax.align.transfer import matching_positions

        tok = t.tokenizer
        # with append_eos, as capture does: the source's own EOS, an empty span at the end of the text
        enc = tok.encode(text, eos=self.append_eos)
        ids, ends = np.asarray(enc.ids, np.int32), np.asarray(enc.byte_end, np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        return _DocOnline(ids, starts, ends, matching_positions(ends, tgt_byte_end))

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
        ce_sum = np.zeros(K)
        nats, nbytes = np.zeros(K), np.zeros(K, np.int64)
        online = {j: _OnlineBlock(t.spec.source_len(T), T) for j, t in enumerate(self.teachers) if t.online}
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
                             "seq_ce": np.float32(ce_sum[j] / n), "seq_bpb": np.float32(bpb)})
        return {"tokens": tokens, "segment_ids": lay["segment_ids"], "positions": lay["positions"],
                "loss_mask": lay["loss_mask"], "doc_index": lay["doc_index"], "token_bytes": token_bytes,
                "teachers": teachers}

    def batch(self, blocks: Sequence[int]) -> dict[str, Any]:
        """Stack the given blocks → the batch dict with a leading dimension len(blocks)."""
        return stack([self(g) for g in blocks])


class _OnlineBlock:
    """One online teacher's part of a block under construction (module docstring)."""

    def __init__(self, Ts: int, T: int):
        self.tokens = np.zeros(Ts, np.int32)
        self.segment_ids = np.zeros(Ts, np.int32)
        self.positions = np.zeros(Ts, np.int32)
        self.token_bytes = np.zeros(Ts, np.int32)
        self.gather = np.full(T, -1, np.int32)
        self.next_ids = np.full(T, -1, np.int32)
        self.used = 0
        self.overflow = 0

    def add(self, dt: _DocOnline, tgt_ids: np.ndarray, s: int, e: int, o: int, lo: int, hi: int, last: bool,
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


def stack(blocks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def rec(items):
        first = items[0]
        if isinstance(first, dict):
            return {key: rec([it[key] for it in items]) for key in first}
        if isinstance(first, (list, tuple)):
            return [rec([it[i] for it in items]) for i in range(len(first))]
        return np.stack(items)

    return rec(list(blocks))


class _LocalBatch:
    """grain map: global step → this host's rows ``[lo, hi)`` of the global batch (a pure function of the step)."""

    def __init__(self, builder: BlockBuilder, global_batch_size: int, rows: tuple[int, int]):
        self.builder, self.B, self.rows = builder, int(global_batch_size), rows

    def __call__(self, step: int) -> dict[str, Any]:
        lo, hi = self.rows
        batch = self.builder.batch([int(step) * self.B + r for r in range(lo, hi)])
        batch["teachers"] = tuple(batch["teachers"])  # a fixed structure through grain; a list again on output
        return batch


# ------------------------------------------------------------------------------------------------ the loader


def _check_teacher(spec: TeacherConfig, cache: TeacherCache, src, cfg: LoaderConfig, store) -> None:
    m = cache.manifest
    name = spec.label

    def fail(field: str, detail: str) -> LoaderError:
        return LoaderError(f"teacher {name}: {field}: {detail} (cache {cache.path})")

    if m.get("tokenizer") != src.fingerprint:
        raise fail("tokenizer", f"the cache was captured with tokenizer fingerprint {str(m.get('tokenizer'))[:16]}… "
                   f"but {spec.tokenizer_path} has {src.fingerprint[:16]}…: give the tokenizer the teacher was captured "
                   "with, or capture again")
    if cache.k < cfg.k:
        raise fail("k", f"the cache holds top-{cache.k} per position but the loader needs k={cfg.k}: lower k or "
                   "capture with a larger k")
    if "append_eos" not in m:
        raise fail("append_eos", "the cache manifest does not say whether EOS was appended")
    if bool(m["append_eos"]) != cfg.append_eos:
        raise fail("append_eos", f"the cache was captured with append_eos={m['append_eos']} but the loader has "
                   f"append_eos={cfg.append_eos}")
    if len(cache) > len(store):
        raise fail("num_docs", f"the cache holds {len(cache)} documents but the document store only {len(store)}")
    docs = m.get("documents")
    fp = docs.get("fingerprint") if isinstance(docs, dict) else docs if isinstance(docs, str) else None
    if fp is not None and fp != store.fingerprint:
        raise fail("documents", f"the cache was captured from documents {fp[:16]}… but the store has "
                   f"{store.fingerprint[:16]}…: capture again from this store")
    split = docs.get("split") if isinstance(docs, dict) else None
    if split is not None and getattr(store, "split", split) != split:
        raise fail("documents.split", f"the cache was captured from split {split!r}, the store is split "
                   f"{store.split!r}")


def _rows_for(mesh, rules, B: int, process_index: int, process_count: int) -> tuple[int, int]:
    """This process's rows of the global batch: those its devices hold under the batch sharding, else p·B/P."""
    if mesh is None:
        if B % process_count:
            raise LoaderError(f"global_batch_size {B} is not divisible by the {process_count} processes")
        per = B // process_count
        return process_index * per, (process_index + 1) * per
    idx = _batch_sharding(mesh, rules, B, 1).addressable_devices_indices_map((B,))
    spans = sorted({sl[0].indices(B)[:2] for sl in idx.values()})
    lo, hi = spans[0][0], max(e for _, e in spans)
    covered = sum(e - s for s, e in spans)
    if covered != hi - lo:
        raise LoaderError(f"this process's devices hold rows {spans} of the batch, not one contiguous range: "
                          "order the mesh devices by process")
    return lo, hi


def _batch_sharding(mesh, rules, B: int, ndim: int):
    from jax.sharding import NamedSharding, PartitionSpec

    from fusion_jax.mesh import logical_to_spec

    spec = logical_to_spec(("batch",), rules, mesh, (B,))
    return NamedSharding(mesh, PartitionSpec(spec[0], *([None] * (ndim - 1))))


class FusionLoader:
    """Per-host batches of packed target blocks with every teacher's transferred rows (module docstring).

    documents: a :class:`~fusion_jax.data.documents.DocumentStore` or its directory (with ``split``);
    target_tokenizer: path of the target tokenizer (the workers load it from there);
    mesh / rules: where global batches live (``batch`` logical axis); without a mesh, iteration yields this
    process's numpy rows. process_index / process_count default to JAX's (pass them to simulate hosts without a
    mesh). state: a :meth:`state` dict to resume from.
    """

    def __init__(self, cfg: LoaderConfig, documents, target_tokenizer: str | Path, *, split: str = "train",
                 mesh=None, rules: dict[str, tuple[str, ...]] | None = None, process_index: int | None = None,
                 process_count: int | None = None, state: dict | None = None, progress: bool = True):
        import jax

        from fusion_jax.align.vocab import vocab_map
        from fusion_jax.tokenizers import load_tokenizer

        cfg.validate()
        self.cfg = cfg
        if isinstance(documents, (str, Path)):
            from fusion_jax.data.documents import DocumentStore

            documents = DocumentStore(documents, split)
        self.store = documents
        self.target_path = str(target_tokenizer)
        target = load_tokenizer(target_tokenizer)
        self.target = target
        if cfg.append_eos and target.eos_id is None:
            raise LoaderError(f"target tokenizer {target_tokenizer}: no EOS token, needed with append_eos=true")

        teachers = []
        for spec in cfg.teachers:
            src = load_tokenizer(spec.tokenizer_path)
            if spec.online:
                if cfg.append_eos and src.eos_id is None:
                    raise LoaderError(f"teacher {spec.label}: tokenizer {spec.tokenizer_path} has no EOS token, needed "
                                      "with append_eos=true")
                table = vocab_map(src, target, spec.vocab_map, cfg.cache_dir)
                teachers.append(_Teacher(spec, None, spec.tokenizer_path, self.target_path, table, src))
                continue
            cache = TeacherCache(spec.cache, verify=cfg.verify)
            _check_teacher(spec, cache, src, cfg, self.store)
            if spec.align == "bytes":
                table = vocab_map(src, target, spec.vocab_map, cfg.cache_dir)
            elif spec.vocab_align == "soft":
                table = vocab_map(src, target, "mined", cfg.cache_dir)
            else:
                table = None
            teachers.append(_Teacher(spec, cache, spec.tokenizer_path, self.target_path, table))

        raw = target_lengths(self.store, target, self.target_path, cfg.cache_dir, workers=cfg.worker_count,
                             progress=progress)
        # Caches captured with max_documents cover a prefix of the store: pack the documents every teacher has.
        self.num_docs = min([len(self.store), *(len(t.cache) for t in teachers if not t.online)])
        if self.num_docs < len(self.store):
            short = [t.name for t in teachers if not t.online and len(t.cache) == self.num_docs]
            log.warning("packing the first %d of %d documents: the caches of %s cover only those", self.num_docs,
                        len(self.store), ", ".join(short))
        raw = raw[:self.num_docs]
        self.plan = PackingPlan(raw + int(cfg.append_eos), cfg.seq_len, cfg.seed)
        self.builder = BlockBuilder(self.plan, self.store, self.target_path, teachers, cfg.k, cfg.append_eos,
                                    cfg.mask_documents, cfg.doc_cache, target=target)
        self.teachers = teachers

        self.mesh, self.rules = mesh, rules
        if mesh is not None and self.rules is None:
            from fusion_jax.mesh import DEFAULT_RULES

            self.rules = dict(DEFAULT_RULES)
        if mesh is not None and ((process_index is not None and process_index != jax.process_index())
                                 or (process_count is not None and process_count != jax.process_count())):
            raise LoaderError("process_index/process_count can only be overridden without a mesh (simulated hosts "
                              "yield numpy rows); with a mesh they are JAX's")
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise LoaderError(f"process_index {self.process_index} not in [0, {self.process_count})")
        B = cfg.global_batch_size
        self.rows = _rows_for(mesh, self.rules, B, self.process_index, self.process_count)
        self._map = _LocalBatch(self.builder, B, self.rows)
        self._step = 0
        self._iter = None
        if state is not None:
            self.restore(state)

    # -------------------------------------------------------------------------------------------- state

    def _identity(self) -> dict[str, Any]:
        c = self.cfg
        return {"plan": self.plan.fingerprint, "global_batch_size": c.global_batch_size, "k": c.k,
                "mask_documents": c.mask_documents, "teachers": [t.label for t in c.teachers]}

    def state(self) -> dict[str, Any]:
        """The position to resume from: ``{"step": next step, ...what the batches depend on}`` (plain values)."""
        return {"step": self._step, **self._identity()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue at ``state["step"]``; a state saved with other data settings is refused, naming the field."""
        mine = self._identity()
        for key, want in mine.items():
            have = state.get(key)
            if isinstance(have, tuple):
                have = list(have)
            if have != want:
                hint = " (documents, target tokenizer, seq_len, seed or append_eos changed)" if key == "plan" else ""
                raise LoaderError(f"loader state: {key}={have!r} was saved but this loader has {key}={want!r}{hint}; "
                                  "resume with the data settings of the saved run")
        step = int(state["step"])
        if step < 0:
            raise LoaderError(f"loader state: step must be non-negative, got {step}")
        self.close()
        self._step = step

    @property
    def step(self) -> int:
        return self._step

    # -------------------------------------------------------------------------------------------- batches

    def local_batch(self, step: int) -> dict[str, Any]:
        """This process's rows of global batch ``step`` as numpy (built here, no grain)."""
        out = self._map(step)
        out["teachers"] = list(out["teachers"])
        return out

    def global_batch(self, step: int):
        """Global batch ``step`` as ``jax.Array``s on the mesh (built here, no grain)."""
        return self.to_global(self.local_batch(step))

    def sharding(self, ndim: int):
        """The NamedSharding of a batch leaf with ``ndim`` dimensions (batch axis first)."""
        if self.mesh is None:
            raise LoaderError("no mesh: give FusionLoader(mesh=...) to make global arrays")
        return _batch_sharding(self.mesh, self.rules, self.cfg.global_batch_size, ndim)

    def to_global(self, local: dict[str, Any]):
        import jax

        B = self.cfg.global_batch_size

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(self.sharding(x.ndim), x, (B, *x.shape[1:]))

        return jax.tree.map(put, local)

    def vocab_maps(self) -> dict[str, np.ndarray]:
        """The online teachers' vocab maps (name → int32[V_src], −1 = unmapped), in config order: constants the
        train step receives once, not per batch."""
        return {t.name: t.table for t in self.teachers if t.online}

    def element_spec(self):
        """The global batch as a pytree of ``jax.ShapeDtypeStruct`` (with shardings when there is a mesh)."""
        import jax

        B, T, k = self.cfg.global_batch_size, self.cfg.seq_len, self.cfg.k

        def s(shape, dtype):
            sh = self.sharding(len(shape)) if self.mesh is not None else None
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

        def teacher(spec: TeacherConfig) -> dict:
            if spec.online:
                Ts = spec.source_len(T)
                return {"src_tokens": s((B, Ts), np.int32), "src_segment_ids": s((B, Ts), np.int32),
                        "src_positions": s((B, Ts), np.int32), "src_token_bytes": s((B, Ts), np.int32),
                        "gather": s((B, T), np.int32), "next_ids": s((B, T), np.int32),
                        "src_overflow": s((B,), np.int32)}
            return {"ids": s((B, T, k), np.int32), "logprobs": s((B, T, k), np.float32), "kind": s((B, T), np.int8),
                    "seq_ce": s((B,), np.float32), "seq_bpb": s((B,), np.float32)}

        return {"tokens": s((B, T), np.int32), "segment_ids": s((B, T), np.int32), "positions": s((B, T), np.int32),
                "loss_mask": s((B, T), np.bool_), "doc_index": s((B, T), np.int32),
                "token_bytes": s((B, T), np.int32), "teachers": [teacher(t) for t in self.cfg.teachers]}

    def _pipeline(self):
        import grain

        c = self.cfg
        ds = grain.MapDataset.range(self._step, self._step + _STEPS_AHEAD).map(self._map)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if c.prefetch else 0,
                                                  prefetch_buffer_size=c.prefetch))
        if c.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain workers read absl flags: unparsed, they raise UnparsedFlagAccessError
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.worker_count,
                                                             per_worker_buffer_size=max(1, c.prefetch)))
        return iter(it)

    def __iter__(self):
        return self

    def __next__(self):
        """The next batch: global ``jax.Array``s with a mesh, else this process's numpy rows."""
        if self._iter is None:
            self._iter = self._pipeline()
        local = next(self._iter)
        local["teachers"] = list(local["teachers"])
        self._step += 1
        return local if self.mesh is None else self.to_global(local)

    def close(self) -> None:
        """Stop the grain pipeline (worker processes); iteration restarts from :attr:`step`."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
