"""Teacher cache: one source model's top-k over a document store, in random-access shards.

A cache directory holds, for documents ``0..N-1`` of one split of a prepared document store:

* ``shard-SSSSS.array_record``: the records of documents ``[S·D, (S+1)·D)`` in order (``D = docs_per_shard``), one
  ArrayRecord record per document (``encode_record``);
* ``shard-SSSSS.json``: the shard's sidecar, written after the shard is complete: its sha256, size, record bytes
  (ArrayRecord compresses chunks and pads its blocks, so the file size differs), documents and per-document token
  counts. A shard counts as done only when both files exist and agree;
* ``manifest.json``: written last, once every shard is done: what was captured (model, tokenizer fingerprint, k,
  documents fingerprint, encodings) plus every sidecar. Readers refuse a cache without it.

Every file is written to a temporary name, fsynced and renamed, so ``kill -9`` at any moment leaves either a complete
file or a ``*.partial`` that the next run removes and redoes (in a bucket, ``gs://``: written locally, then uploaded
whole; readers read downloaded copies, :func:`fusion_jax.files.local_copy`).

Record layout (little-endian; n tokens, k candidates; ``I`` = uint16 when the vocabulary has ≤ 65,536 ids, else int32):

====================  =================  ============================================================================
field                 type               meaning
====================  =================  ============================================================================
header                ``<4sBBBBIIfI``    magic ``FJTC``, version, id bytes (2/4), logprob format, k, n, doc index,
                                         doc CE (float32), document bytes
doc id                uint16 + UTF-8     the document id (checked against the store when loading)
ids                   I[n]               the teacher's tokens of the document (EOS included when captured with it)
byte lengths          uint16[n]          ``byte_end[i] − byte_end[i−1]``: token i's span in the UTF-8 text
top-k ids             I[n·k]             candidates per position, best first
log-probs             see below          log_softmax over the full vocabulary, descending
token CE              float16[n]         −log p(ids[i+1]); NaN at the last position
====================  =================  ============================================================================

Log-prob formats: ``quantized`` (default) stores the top-1 log-prob as float16 and each other candidate as its gap
below the top-1 in uint8 steps of 1/32 nat (255 = padding, −inf); gaps beyond 254/32 ≈ 7.9 nats (probability below
3.6e-4 × the top-1's) are clipped there. Error: ≤ 1/64 nat per entry, i.e. ≤ 1.6 % relative in probability, top-1
exact to float16. Size at k = 10, ≤ 65,536 ids: 2 + 2 + 20 + 2 + 9 + 2 = **37 bytes per token**. ``float16`` stores
every log-prob as float16 (46 bytes per token).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import struct
from typing import Any, Iterable, Literal

import numpy as np

from fusion_jax.errors import InputError
from fusion_jax.files import AnyPath, as_path, atomic_path, file_sha256, file_size, local_copy, read_json

FORMAT = "fusion_jax.teacher_cache"
VERSION = 1
MAGIC = b"FJTC"
LogprobFormat = Literal["quantized", "float16"]
LOGPROB_FORMATS: tuple[str, ...] = ("quantized", "float16")
_HEADER = struct.Struct("<4sBBBBIIfI")
_GAP_STEP = 32.0  # quantization steps per nat
_GAP_PAD = 255
_GAP_MAX = 254
MANIFEST = "manifest.json"
MANIFEST_FIX = (f"delete {MANIFEST} and run the capture again: it keeps the finished shards and writes the manifest "
                "anew")


class CacheError(InputError):
    """A teacher cache that cannot be used: missing, incomplete, corrupted, or captured for something else."""


@dataclasses.dataclass(frozen=True)
class TeacherRecord:
    """One document as a teacher saw it.

    ids int32[n], byte_end int32[n], topk_ids int32[n, k], topk_logprobs float32[n, k] (descending, −inf pads),
    token_ce float32[n] (NaN at the last position), doc_ce (mean of token_ce over positions with a next token, the
    official ``metric_ce``), num_bytes (UTF-8 bytes of the text), doc_index / doc_id (position and id in the store).
    """

    doc_index: int
    doc_id: str
    ids: np.ndarray
    byte_end: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    token_ce: np.ndarray
    doc_ce: float
    num_bytes: int

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])


def record_overhead(doc_id: str) -> int:
    """Bytes of a record beyond its per-token fields: the header and the document id."""
    return _HEADER.size + 2 + len(doc_id.encode("utf-8"))


def id_bytes_for(vocab_size: int) -> int:
    return 2 if vocab_size <= 1 << 16 else 4


def bytes_per_token(k: int, vocab_size: int, logprob_format: LogprobFormat = "quantized") -> int:
    """Record bytes per token (excluding the per-document header and id)."""
    w = id_bytes_for(vocab_size)
    lp = 2 + (k - 1) if logprob_format == "quantized" else 2 * k
    return w + 2 + w * k + lp + 2


def encode_record(rec: TeacherRecord, vocab_size: int, logprob_format: LogprobFormat = "quantized") -> bytes:
    """TeacherRecord → bytes (module docstring). Validates shapes, ranges and the descending order."""
    n, k = rec.topk_ids.shape if rec.topk_ids.ndim == 2 else (-1, -1)
    if n < 0 or rec.topk_logprobs.shape != (n, k) or rec.ids.shape != (n,) or rec.byte_end.shape != (n,) \
            or rec.token_ce.shape != (n,):
        raise ValueError(
            f"record {rec.doc_id!r}: shapes ids {rec.ids.shape}, byte_end {rec.byte_end.shape}, topk_ids "
            f"{rec.topk_ids.shape}, topk_logprobs {rec.topk_logprobs.shape}, token_ce {rec.token_ce.shape} do not "
            "agree on [n] / [n, k]"
        )
    if not 1 <= k <= 255:
        raise ValueError(f"record {rec.doc_id!r}: k must be in [1, 255], got {k}")
    if logprob_format not in LOGPROB_FORMATS:
        raise ValueError(f"logprob_format must be one of {LOGPROB_FORMATS}, got {logprob_format!r}")
    w = id_bytes_for(vocab_size)
    for name, a in (("ids", rec.ids), ("topk_ids", rec.topk_ids)):
        if a.size and (a.min() < 0 or a.max() >= vocab_size):
            raise ValueError(f"record {rec.doc_id!r}: {name} outside [0, {vocab_size})")
    lengths = np.diff(np.asarray(rec.byte_end, np.int64), prepend=0)
    if lengths.size and (lengths.min() < 0 or lengths.max() > 0xFFFF):
        raise ValueError(f"record {rec.doc_id!r}: byte_end must be non-decreasing with tokens of at most 65535 bytes")
    lp = np.asarray(rec.topk_logprobs, np.float32)
    if np.isnan(lp).any() or (lp > 0).any():
        raise ValueError(f"record {rec.doc_id!r}: top-k log-probs must be ≤ 0 and not NaN")
    if (lp[:, 1:] > lp[:, :-1]).any():
        raise ValueError(f"record {rec.doc_id!r}: top-k log-probs must be sorted in descending order")
    doc_id = rec.doc_id.encode("utf-8")
    idt = np.dtype("<u2") if w == 2 else np.dtype("<i4")
    parts = [
        _HEADER.pack(MAGIC, VERSION, w, LOGPROB_FORMATS.index(logprob_format), k, n, rec.doc_index,
                     float(rec.doc_ce), rec.num_bytes),
        struct.pack("<H", len(doc_id)), doc_id,
        np.asarray(rec.ids).astype(idt).tobytes(),
        lengths.astype("<u2").tobytes(),
        np.asarray(rec.topk_ids).astype(idt).tobytes(),
    ]
    if logprob_format == "quantized":
        pad = np.isneginf(lp[:, 1:])  # descending: a finite entry has a finite top-1
        gaps = np.where(pad, 0.0, lp[:, :1] - np.where(pad, 0.0, lp[:, 1:]))
        q = np.where(pad, _GAP_PAD, np.minimum(np.rint(gaps * _GAP_STEP), _GAP_MAX))
        parts += [lp[:, 0].astype("<f2").tobytes(), q.astype(np.uint8).tobytes()]
    else:
        parts.append(lp.astype("<f2").tobytes())
    parts.append(np.asarray(rec.token_ce, np.float32).astype("<f2").tobytes())
    return b"".join(parts)


def decode_record(data: bytes) -> TeacherRecord:
    """bytes → TeacherRecord (arrays decoded to int32/float32)."""
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        raise CacheError("not a teacher-cache record (bad magic)")
    magic, version, w, fmt, k, n, doc_index, doc_ce, num_bytes = _HEADER.unpack_from(data, 0)
    if version != VERSION:
        raise CacheError(f"teacher-cache record version {version}, this fusion_jax reads version {VERSION}")
    off = _HEADER.size
    (id_len,) = struct.unpack_from("<H", data, off)
    off += 2
    doc_id = data[off:off + id_len].decode("utf-8")
    off += id_len
    idt = np.dtype("<u2") if w == 2 else np.dtype("<i4")

    def take(dtype, count):
        nonlocal off
        a = np.frombuffer(data, dtype, count, off)
        off += a.nbytes
        return a

    ids = take(idt, n).astype(np.int32)
    byte_end = np.cumsum(take("<u2", n), dtype=np.int64).astype(np.int32)
    topk_ids = take(idt, n * k).astype(np.int32).reshape(n, k)
    if LOGPROB_FORMATS[fmt] == "quantized":
        top1 = take("<f2", n).astype(np.float32)
        q = take(np.uint8, n * (k - 1)).reshape(n, k - 1)
        rest = np.where(q == _GAP_PAD, -np.inf, top1[:, None] - q.astype(np.float32) / _GAP_STEP)
        topk_logprobs = np.concatenate([top1[:, None], rest], axis=1).astype(np.float32)
    else:
        topk_logprobs = take("<f2", n * k).astype(np.float32).reshape(n, k)
    token_ce = take("<f2", n).astype(np.float32)
    if off != len(data):
        raise CacheError(f"teacher-cache record {doc_id!r} has {len(data) - off} trailing bytes")
    return TeacherRecord(doc_index, doc_id, ids, byte_end, topk_ids, topk_logprobs, token_ce, float(doc_ce), num_bytes)


# ------------------------------------------------------------------------------------------------ files on disk


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.array_record"


def sidecar_name(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def num_shards(num_docs: int, docs_per_shard: int) -> int:
    return -(-num_docs // docs_per_shard)


def shard_docs(shard: int, num_docs: int, docs_per_shard: int) -> range:
    return range(shard * docs_per_shard, min((shard + 1) * docs_per_shard, num_docs))


def _partial(path: AnyPath) -> AnyPath:
    """The temporary name `path` is written under: a leftover one (a `kill -9`) is removed by `done_shards`."""
    return path.with_name(path.name + ".partial")


def write_atomic(path: AnyPath, data: bytes) -> None:
    with atomic_path(path, tmp=_partial(path)) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as e:
            if e.filename is None:  # a failed write (disk full) does not say which file
                raise OSError(e.errno, e.strerror, str(tmp)) from e
            raise


def _os_error(e: RuntimeError, path: AnyPath) -> OSError:
    """ArrayRecord's RuntimeError (e.g. "write() failed: No space left on device; …") as the OSError it stands for,
    naming our file, so the CLI prints one line with the fix."""
    message = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO):
        if os.strerror(code) in message:
            return OSError(code, os.strerror(code), str(path))
    return OSError(errno.EIO, f"cannot write ({message.splitlines()[0] if message else type(e).__name__})", str(path))


def write_shard(cache_dir: str | AnyPath, shard: int, records: Iterable[bytes], doc_tokens: list[int]) -> dict:
    """Write one complete shard (records in document order) and then its sidecar; → the sidecar dict."""
    from array_record.python.array_record_module import ArrayRecordWriter

    cache_dir = as_path(cache_dir)
    path = cache_dir / shard_name(shard)
    count = record_bytes = 0
    with atomic_path(path, tmp=_partial(path)) as tmp:
        try:
            writer = ArrayRecordWriter(str(tmp), "group_size:1")  # one record per chunk: random access per document
            try:
                for rec in records:
                    writer.write(rec)
                    count += 1
                    record_bytes += len(rec)
            finally:
                writer.close()
        except RuntimeError as e:  # ArrayRecord reports I/O failures (a full disk) as RuntimeError, at close latest
            raise _os_error(e, tmp) from e
        if count != len(doc_tokens):
            raise ValueError(f"shard {shard}: {count} records but {len(doc_tokens)} token counts")
        size, sha256 = tmp.stat().st_size, file_sha256(tmp)  # the local file (also when bound for an object store)
    sidecar = {"shard": shard, "file": path.name, "size": size, "sha256": sha256,
               "num_docs": count, "record_bytes": record_bytes, "tokens": int(sum(doc_tokens)),
               "doc_tokens": [int(t) for t in doc_tokens]}
    write_atomic(cache_dir / sidecar_name(shard), json.dumps(sidecar).encode())
    return sidecar


def done_shards(cache_dir: str | AnyPath, shards: Iterable[int]) -> dict[int, dict]:
    """The shards among ``shards`` that are complete (shard + agreeing sidecar) → their sidecars. Leftover
    ``*.partial`` files of these shards are removed, and a shard without a valid sidecar is deleted to be redone."""
    cache_dir = as_path(cache_dir)
    out = {}
    for s in shards:
        path, side = cache_dir / shard_name(s), cache_dir / sidecar_name(s)
        for leftover in (_partial(path), _partial(side)):
            leftover.unlink(missing_ok=True)
        try:
            sidecar = json.loads(side.read_text())
            if sidecar["shard"] == s and file_size(path) == sidecar["size"]:
                out[s] = sidecar
                continue
        except (OSError, ValueError, KeyError):
            pass
        path.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
    return out


def write_manifest(cache_dir: str | AnyPath, spec: dict[str, Any], sidecars: list[dict]) -> dict:
    """The manifest: ``spec`` (what was captured) + every shard's sidecar + totals. Written last, atomically."""
    sidecars = sorted(sidecars, key=lambda s: s["shard"])
    manifest = {
        "format": FORMAT, "version": VERSION, **spec, "num_shards": len(sidecars),
        "num_docs": sum(s["num_docs"] for s in sidecars), "tokens": sum(s["tokens"] for s in sidecars),
        "bytes": sum(s["size"] for s in sidecars), "record_bytes": sum(s["record_bytes"] for s in sidecars),
        "shards": sidecars,
    }
    write_atomic(as_path(cache_dir) / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


# ------------------------------------------------------------------------------------------------ reading


class TeacherCache:
    """Random access to a complete cache: ``cache[doc_index] → TeacherRecord``. Picklable (files reopen lazily).

    ``expect``: manifest fields this run requires (e.g. model, tokenizer fingerprint, k, documents fingerprint);
    any difference is a :class:`CacheError` naming the field and both values. ``verify``: ``"full"`` checks every
    shard's sha256 now, ``"size"`` only sizes (fast, for worker processes that re-open a verified cache).
    """

    def __init__(self, path: str | AnyPath, expect: dict[str, Any] | None = None, verify: str = "full"):
        self.path = as_path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            partial = any(self.path.glob("shard-*.json")) if self.path.is_dir() else False
            raise CacheError(
                f"{self.path}: no {MANIFEST} — "
                + ("the capture did not finish; re-run it to complete the cache" if partial
                   else "not a teacher cache (run `python -m fusion_jax.capture` to create it)")
            )
        self.manifest = read_json(manifest_path, CacheError, MANIFEST_FIX)
        if not isinstance(self.manifest, dict):
            raise CacheError(f"{manifest_path}: expected a JSON object; {MANIFEST_FIX}")
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise CacheError(
                f"{self.path}: {MANIFEST} is format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('version')!r}; expected {FORMAT!r} version {VERSION}"
            )
        for key, want in (expect or {}).items():
            have = self.manifest.get(key)
            if have != want:
                raise CacheError(
                    f"{self.path}: the cache was captured with {key}={have!r} but this run needs {key}={want!r}; "
                    "point the run at the right cache or capture again into a new directory"
                )
        self.docs_per_shard = int(self.manifest["docs_per_shard"])
        self.num_docs = int(self.manifest["num_docs"])
        self.k = int(self.manifest["k"])
        self._shards = {s["shard"]: s for s in self.manifest["shards"]}
        if sorted(self._shards) != list(range(num_shards(self.num_docs, self.docs_per_shard))):
            raise CacheError(f"{self.path}: {MANIFEST} does not list shards 0..N-1 for {self.num_docs} documents")
        if verify not in ("full", "size"):
            raise ValueError(f"verify must be 'full' or 'size', got {verify!r}")
        for s, side in self._shards.items():
            self._check_shard(s, side, full=verify == "full")
        self._readers: dict[int, Any] = {}

    def _check_shard(self, s: int, side: dict, full: bool) -> None:
        path = self.path / side["file"]
        if not path.is_file():
            raise CacheError(f"{self.path}: shard {s} ({side['file']}) is missing")
        size = file_size(path)
        if size != side["size"]:
            raise CacheError(
                f"{self.path}: shard {s} ({side['file']}) has {size} bytes, the manifest says "
                f"{side['size']}: the file is truncated or was replaced; capture again"
            )
        if full and file_sha256(local_copy(path)) != side["sha256"]:  # (downloaded once from a store)
            raise CacheError(
                f"{self.path}: shard {s} ({side['file']}) fails its sha256 checksum: the file is corrupted; "
                "delete it and its .json sidecar and re-run the capture to redo it"
            )

    def __len__(self) -> int:
        return self.num_docs

    def doc_tokens(self) -> np.ndarray:
        """int64[N] tokens per document (from the sidecars; no record is read)."""
        return np.concatenate([np.asarray(self._shards[s]["doc_tokens"], np.int64) for s in sorted(self._shards)])

    def __getitem__(self, doc_index: int) -> TeacherRecord:
        if not 0 <= doc_index < self.num_docs:
            raise IndexError(f"document {doc_index} not in the cache (0..{self.num_docs - 1})")
        s, i = divmod(doc_index, self.docs_per_shard)
        reader = self._readers.get(s)
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader

            reader = ArrayRecordReader(str(local_copy(self.path / self._shards[s]["file"])),
                                       "readahead_buffer_size:0,max_parallelism:0")
            self._readers[s] = reader
        try:
            rec = decode_record(reader.read([i])[0])
        except (CacheError, RuntimeError) as e:  # ArrayRecord raises RuntimeError on a damaged chunk
            raise CacheError(
                f"{self.path}: shard {s} ({self._shards[s]['file']}) record {i} cannot be read ({e}); the shard is "
                "corrupted: delete it and its .json sidecar and re-run the capture"
            ) from None
        if rec.doc_index != doc_index:
            raise CacheError(f"{self.path}: shard {s} record {i} holds document {rec.doc_index}, not {doc_index}")
        return rec

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers = {}
