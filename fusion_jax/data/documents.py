"""The prepared documents store: the output of `python -m fusion_jax.prepare`, read by capture and the loader.

On disk, a directory:

  train.array_record        one record per document, in order: compact UTF-8 JSON {"id", "text", "domain"}
  validation.array_record   (ArrayRecord, group_size 1, for random access)
  documents.json            {"format": "fusion_jax.documents", "version": 1,
                             "splits": {split: {"documents", "bytes", "fingerprint",
                                                "domains": {domain: {"documents", "bytes"}}}},
                             ...the writer's meta: "prepare" (config), "tokenizers" (name, path, fingerprint)}

`bytes` counts the texts' UTF-8 bytes; `fingerprint` is sha256 over the split's records in order (each
prefixed by its length), so two stores with equal fingerprints hold the same documents in the same order.

A store is written to `<out>.partial` and renamed to `<out>` once complete (documents.json is written last),
so a directory with documents.json is complete. `DocumentStore` is picklable and opens its file lazily,
for grain worker processes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from fusion_jax.data.corpus import Document
from fusion_jax.errors import InputError
from fusion_jax.files import (AnyPath, as_path, check_replaceable, commit_directory, local_copy, staging_path,
                              remove_tree)

__all__ = ["DocumentStore", "DocumentWriter", "StoreError", "SPLITS", "read_meta", "write_documents"]

FORMAT = "fusion_jax.documents"
VERSION = 1
SPLITS = ("train", "validation")
META_FILE = "documents.json"
_WRITER_OPTIONS = "group_size:1"
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access (array_record's advice)
_FINGERPRINT_SALT = b"fusion_jax.documents.v1\0"


class StoreError(InputError):
    """A documents store that is missing, incomplete, of another version, or in the way of a new one."""


def encode_record(doc: Document) -> bytes:
    return json.dumps({"id": doc.id, "text": doc.text, "domain": doc.domain},
                      ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_record(data: bytes) -> Document:
    r = json.loads(data)
    return Document(r["id"], r["text"], r["domain"])


def _array_record():
    from array_record.python import array_record_module

    return array_record_module


class _SplitStats:
    def __init__(self) -> None:
        self.documents = self.bytes = 0
        self.domains: dict[str, dict[str, int]] = {}
        self.hash = hashlib.sha256(_FINGERPRINT_SALT)

    def add(self, doc: Document, record: bytes) -> None:
        n = len(doc.text.encode("utf-8"))
        self.documents += 1
        self.bytes += n
        d = self.domains.setdefault(doc.domain, {"documents": 0, "bytes": 0})
        d["documents"] += 1
        d["bytes"] += n
        self.hash.update(len(record).to_bytes(8, "little"))
        self.hash.update(record)

    def to_dict(self) -> dict:
        return {"documents": self.documents, "bytes": self.bytes, "fingerprint": self.hash.hexdigest(),
                "domains": {k: self.domains[k] for k in sorted(self.domains)}}


def _check_replaceable(out_dir: AnyPath, overwrite: bool) -> None:
    # Only ever delete what this module wrote (or nothing at all).
    check_replaceable(out_dir, overwrite, markers=(META_FILE,), what="a documents store", error=StoreError)


class DocumentWriter:
    """Stream documents into a new store: `with DocumentWriter(out, meta) as w: w.add(doc, "train")`.

    Entering checks `out_dir` (an existing store is kept unless `overwrite`; a non-store path is never
    replaced) and removes a leftover `<out_dir>.partial`. Leaving without an exception writes documents.json
    and renames the partial directory into place; leaving with one removes the partial directory.
    After a clean exit, `.meta` holds the written documents.json content.
    """

    def __init__(self, out_dir: str | AnyPath, meta: Mapping[str, Any] | None = None, overwrite: bool = False):
        self.out_dir = as_path(out_dir)
        self.extra = dict(meta or {})
        reserved = {"format", "version", "splits"} & set(self.extra)
        if reserved:
            raise ValueError(f"meta keys {sorted(reserved)} are reserved for the store itself")
        self.overwrite = overwrite
        self.meta: dict | None = None
        self._writers: dict[str, Any] = {}
        self._stats: dict[str, _SplitStats] = {}

    def __enter__(self) -> DocumentWriter:
        _check_replaceable(self.out_dir, self.overwrite)
        partial = staging_path(self.out_dir)  # local: ArrayRecord writes local files
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        ar = _array_record()
        for split in SPLITS:
            self._writers[split] = ar.ArrayRecordWriter(str(partial / f"{split}.array_record"), _WRITER_OPTIONS)
            self._stats[split] = _SplitStats()
        return self

    def add(self, doc: Document, split: str) -> None:
        if split not in self._writers:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        record = encode_record(doc)
        self._writers[split].write(record)
        self._stats[split].add(doc, record)

    def __exit__(self, exc_type, exc, tb) -> None:
        for w in self._writers.values():
            w.close()
        partial = staging_path(self.out_dir)
        if exc_type is not None:
            shutil.rmtree(partial, ignore_errors=True)
            return
        meta = {"format": FORMAT, "version": VERSION,
                "splits": {s: self._stats[s].to_dict() for s in SPLITS}, **self.extra}
        (partial / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        _check_replaceable(self.out_dir, self.overwrite)  # again: it may have appeared meanwhile
        if self.out_dir.exists():
            remove_tree(self.out_dir)
        commit_directory(partial, self.out_dir, markers=(META_FILE,))
        self.meta = meta


def write_documents(out_dir: str | AnyPath, train_docs: Iterable[Document], validation_docs: Iterable[Document],
                    meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict:
    """Write a store from two document iterables (consumed in order); returns the documents.json content."""
    with DocumentWriter(out_dir, meta, overwrite) as w:
        for split, docs in zip(SPLITS, (train_docs, validation_docs)):
            for doc in docs:
                w.add(doc, split)
    return w.meta


def read_meta(path: str | AnyPath) -> dict:
    """documents.json of a complete store; StoreError / FileNotFoundError name what is wrong and the fix."""
    path = as_path(path)
    if not path.is_dir():
        partial = staging_path(path)
        hint = f" ({partial.name} exists: prepare did not finish; run it again)" if partial.exists() else ""
        raise FileNotFoundError(f"{path}: no documents store here{hint}; create it with python -m fusion_jax.prepare")
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise StoreError(f"{path}: incomplete documents store (no {META_FILE}); run python -m fusion_jax.prepare "
                         "again with overwrite=true")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{meta_file}: damaged ({e}); prepare the store again (python -m fusion_jax.prepare with "
                         "overwrite=true)") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{meta_file}: damaged (a JSON {type(meta).__name__}, not an object); prepare the store "
                         "again (python -m fusion_jax.prepare with overwrite=true)")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StoreError(f"{path}: {META_FILE} has format {meta.get('format')!r} version {meta.get('version')!r}; "
                         f"this code reads {FORMAT!r} version {VERSION}: prepare the corpus again")
    return meta


class DocumentStore:
    """One split of a prepared store as a random-access sequence of `Document`s (a grain data source).

    len(store) = documents in the split; store[i] -> Document (negative i counts from the end).
    `.meta` is documents.json, `.fingerprint` the split's content fingerprint. Thread-safe; picklable (the
    file is opened again, lazily, after unpickling).
    """

    def __init__(self, path: str | AnyPath, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.path, self.split = as_path(path), split
        self.meta = read_meta(self.path)
        self._info = self.meta["splits"][split]
        self._file = self.path / f"{split}.array_record"
        if not self._file.is_file():
            raise StoreError(f"{self.path}: incomplete documents store ({self._file.name} is missing); "
                             "run python -m fusion_jax.prepare again with overwrite=true")
        self._local = local_copy(self._file)  # ArrayRecord reads local files: an object store's is downloaded
        self._lock, self._reader = threading.Lock(), None
        n = self._open().num_records()
        if n != len(self):
            raise StoreError(f"{self._file}: holds {n} records, {META_FILE} says {len(self)}; the store is damaged: "
                             "run python -m fusion_jax.prepare again with overwrite=true")

    @property
    def fingerprint(self) -> str:
        return self._info["fingerprint"]

    def __len__(self) -> int:
        return self._info["documents"]

    def _open(self):
        if self._reader is None:
            with self._lock:
                if self._reader is None:
                    self._reader = _array_record().ArrayRecordReader(str(self._local), _READER_OPTIONS)
        return self._reader

    def _index(self, i: int) -> int:
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"document index {i} out of range for {n} documents ({self.split})")
        return j

    def __getitem__(self, i: int) -> Document:
        return decode_record(self._open().read([self._index(int(i))])[0])

    def __getitems__(self, indices: Iterable[int]) -> list[Document]:
        return [decode_record(r) for r in self._open().read([self._index(int(i)) for i in indices])]

    def __iter__(self) -> Iterator[Document]:
        chunk = 1024
        for start in range(0, len(self), chunk):
            for r in self._open().read(start, min(start + chunk, len(self))):
                yield decode_record(r)

    def verify(self) -> None:
        """Re-hash every record; StoreError if the content does not match documents.json."""
        h = hashlib.sha256(_FINGERPRINT_SALT)
        for start in range(0, len(self), 1024):
            for r in self._open().read(start, min(start + 1024, len(self))):
                h.update(len(r).to_bytes(8, "little"))
                h.update(r)
        if h.hexdigest() != self.fingerprint:
            raise StoreError(f"{self._file}: content does not match the fingerprint in {META_FILE}; the store is "
                             "damaged: run python -m fusion_jax.prepare again with overwrite=true")

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"] = state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DocumentStore({str(self.path)!r}, split={self.split!r}, documents={len(self)})"
