"""Corpus readers: text files, JSON lines, Parquet, Hugging Face `datasets`, TFDS → a stream of `Document`s.

`read_documents(cfg)` yields `Document(id, text, domain)` in a deterministic order (files sorted by relative
path, records in file order). Texts are exact: files are read as bytes and decoded as strict UTF-8 (no newline
translation, no normalization); bytes fields are decoded the same way. Every error names the file or dataset,
the record and the fix. Empty texts are skipped and counted.

Default ids are positional and do not depend on where the corpus lies on disk, so `split_of(id)` puts a
document in the same split on every machine:

  text     `<path relative to the given directory>` (a file given directly: its name)
  jsonl    `<file>:<line>` (line numbers from 1; `<file>` as for text)
  parquet  `<file>:<row>` (rows from 0)
  hf/tfds  `<split>:<index>` (from 0)

Field names may be dotted to reach into nested records (`meta.pile_set_name` in The Pile's JSON lines);
a key that itself contains the dot wins.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fusion_jax.config.schema import CorpusConfig
from fusion_jax.errors import InputError

__all__ = ["CorpusConfig", "CorpusError", "Document", "read_documents", "split_of"]

log = logging.getLogger(__name__)

DEFAULT_GLOB = {"text": "**/*.txt", "jsonl": "**/*.jsonl", "parquet": "**/*.parquet"}
_MISSING = object()


class CorpusError(InputError):
    """A corpus that cannot be read as configured; the message names the place and the fix."""


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    """One document: a unique `id`, its exact `text` and the `domain` it is reported under."""

    id: str
    text: str
    domain: str


def split_of(doc_id: str, validation_fraction: float) -> str:
    """`"validation"` or `"train"` for a document id, the same on every machine and Python version.

    u = (first 8 bytes of sha256(id as UTF-8), big-endian) / 2**64, uniform in [0, 1); the document is in
    validation iff u < validation_fraction. (Python's `hash` is salted per process, hence sha256.)
    """
    if not 0.0 <= validation_fraction <= 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    u = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2.0**64
    return "validation" if u < validation_fraction else "train"


def read_documents(cfg: CorpusConfig) -> Iterator[Document]:
    """Yield the corpus's non-empty documents in a deterministic order (see the module docstring).

    Raises FileNotFoundError for a missing path and `CorpusError` for a missing field, a text that is not
    valid UTF-8 or not a string, and a duplicate id.
    """
    cfg.require()
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf, "tfds": _read_tfds}
    seen: set[str] = set()
    n = empty = 0
    for default_id, record, where in readers[cfg.format](cfg):
        text = _text_of(record, cfg, where)
        if not text:
            empty += 1
            continue
        doc_id = _label(record, cfg.id_field, "id_field", where) if cfg.id_field else default_id
        if doc_id in seen:
            raise CorpusError(
                f"{where}: duplicate document id {doc_id!r}; ids must be unique "
                + (f"(id_field {cfg.id_field!r} repeats: leave id_field empty for positional ids)" if cfg.id_field
                   else "(the same file is read twice, or two files share a name: list each once, or use one parent directory)"))
        seen.add(doc_id)
        domain = _label(record, cfg.domain_field, "domain_field", where) if cfg.domain_field else cfg.domain
        yield Document(doc_id, text, domain)
        n += 1
        if n == cfg.max_documents:
            break
    log.info("corpus (%s, %s): %d documents, %d empty skipped", cfg.format, ", ".join(cfg.paths), n, empty)


# Each reader yields (default id, record mapping, where) with `where` naming the record in messages.


def _field(record: Mapping, name: str, option: str, where: str) -> Any:
    value = record.get(name, _MISSING)
    if value is _MISSING:
        value = record
        for part in name.split("."):
            value = value.get(part, _MISSING) if isinstance(value, Mapping) else _MISSING
            if value is _MISSING:
                break
    if value is _MISSING:
        raise CorpusError(
            f"{where}: field {name!r} is not in the records; available fields: {', '.join(map(str, record)) or '(none)'}. "
            f"Set corpus.{option} to one of them")
    return value


def _decode(data: bytes, where: str, base: int = 0, of: str = "text") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{where}: not valid UTF-8 at byte offset {base + e.start} of the {of} ({data[e.start:e.start + 4]!r}: "
            f"{e.reason}); re-encode the source as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)") from None


def _label(record: Mapping, name: str, option: str, where: str) -> str:
    """An id or domain value as a string (bytes decoded as UTF-8, numbers as written)."""
    value = _field(record, name, option, where)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(bytes(value), f"{where} ({option} {name!r})", of="value")
    return str(value)


def _text_of(record: Mapping, cfg: CorpusConfig, where: str) -> str:
    value = _field(record, cfg.text_field, "text_field", where)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(bytes(value), where)
    if not isinstance(value, str):
        raise CorpusError(
            f"{where}: field {cfg.text_field!r} holds {type(value).__name__} {repr(value)[:60]}, not a string; "
            "corpus.text_field must name a string (or UTF-8 bytes) field")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # an unpaired surrogate, e.g. from a JSON "\ud800" escape
        off = len(value[: e.start].encode("utf-8", "surrogatepass"))
        raise CorpusError(
            f"{where}: text is not valid UTF-8: byte offset {off} of the text holds an unpaired surrogate "
            f"{value[e.start]!r}; fix the source record") from None
    return value


def _files(cfg: CorpusConfig) -> Iterator[tuple[Path, str]]:
    """(file, name for ids) for every path: a file as given, a directory's files matching the glob, sorted."""
    pattern = cfg.glob or DEFAULT_GLOB[cfg.format]
    for p in map(Path, cfg.paths):
        if p.is_file():
            yield p, p.name
        elif p.is_dir():
            found = sorted((f.relative_to(p).as_posix(), f) for f in p.glob(pattern) if f.is_file())
            if not found:
                raise CorpusError(f"{p}: no files match corpus.glob {pattern!r} in this directory; set corpus.glob")
            for rel, f in found:
                yield f, rel
        else:
            raise FileNotFoundError(f"{p}: no such file or directory (corpus.paths)")


def _format_hint(path: Path, configured: str) -> str:
    """"; it looks like X: set corpus.format=X" when the file's first bytes say it is another format, else ""."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    if head[:4] == b"PAR1":
        kind = "parquet"
    elif head.lstrip()[:1] == b"{" or (head[:2] == b"\x1f\x8b" and ".jsonl" in path.name):
        kind = "jsonl"
    else:
        try:
            head.decode("utf-8")
            kind = "text"
        except UnicodeDecodeError as e:
            kind = "text" if e.start > len(head) - 4 else ""  # a character cut by the 4096-byte window
    return f"; it looks like {kind}: set corpus.format={kind}" if kind and kind != configured else ""


def _read_text(cfg: CorpusConfig) -> Iterator[tuple[str, Mapping, str]]:
    for path, name in _files(cfg):
        try:
            text = _decode(path.read_bytes(), str(path), of="file")
        except CorpusError as e:
            raise CorpusError(f"{e}{_format_hint(path, 'text')}") from None
        yield name, {cfg.text_field: text}, str(path)


def _read_jsonl(cfg: CorpusConfig) -> Iterator[tuple[str, Mapping, str]]:
    for path, name in _files(cfg):
        opener = gzip.open if path.suffix == ".gz" else open
        offset = 0  # of the line in the (decompressed) file, for messages
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path} line {lineno}"
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                try:
                    line = _decode(raw, where, base=start, of="file")
                except CorpusError as e:
                    raise CorpusError(f"{e}{_format_hint(path, 'jsonl')}") from None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); corpus.format 'jsonl' "
                                      f"wants one JSON object per line{_format_hint(path, 'jsonl')}") from None
                if not isinstance(record, dict):
                    raise CorpusError(f"{where}: a JSON {type(record).__name__}, not an object; "
                                      "corpus.format 'jsonl' wants one JSON object per line")
                yield f"{name}:{lineno}", record, where


def _fields(cfg: CorpusConfig) -> list[str]:
    return [f for f in (cfg.text_field, cfg.id_field, cfg.domain_field) if f]


def _columns(cfg: CorpusConfig, available: list[str], source: str) -> list[str]:
    """Top-level columns holding the configured fields, checked against the schema before reading."""
    cols = []
    for option, name in (("text_field", cfg.text_field), ("id_field", cfg.id_field), ("domain_field", cfg.domain_field)):
        if not name:
            continue
        col = name if name in available else name.split(".")[0]
        if col not in available:
            raise CorpusError(f"{source}: field {name!r} is not in the records; available fields: "
                              f"{', '.join(available)}. Set corpus.{option} to one of them")
        if col not in cols:
            cols.append(col)
    return cols


def _read_parquet(cfg: CorpusConfig) -> Iterator[tuple[str, Mapping, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path, name in _files(cfg):
        row = 0
        try:
            pf = pq.ParquetFile(path)
            cols = _columns(cfg, pf.schema_arrow.names, str(path))
            for batch in pf.iter_batches(batch_size=256, columns=cols):
                for record in batch.to_pylist():
                    yield f"{name}:{row}", record, f"{path} row {row}"
                    row += 1
        except pa.ArrowException as e:  # not Parquet, truncated, corrupted
            where = f" (after row {row - 1})" if row else ""
            raise CorpusError(f"{path}: cannot be read as Parquet{where}: {e}{_format_hint(path, 'parquet')}") from None


def _open_hf(cfg: CorpusConfig):
    """The split of a saved dataset directory (save_to_disk), or load_dataset's: a hub id, a local dataset
    directory, or a packaged builder (json, parquet, csv, text) over cfg.data_files; streamed with cfg.streaming."""
    import datasets

    (name,) = cfg.paths
    split = cfg.split
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        import pyarrow as pa

        if cfg.hf_config or cfg.data_files:
            raise CorpusError(f"{name}: a saved dataset (save_to_disk) has no configurations or data files: leave "
                              "corpus.hf_config and corpus.data_files empty")
        try:
            ds = datasets.load_from_disk(str(path))
        except (json.JSONDecodeError, pa.ArrowException) as e:  # a truncated state.json, dataset_info.json, .arrow
            raise CorpusError(f"{name}: damaged saved dataset, datasets.load_from_disk failed ({e}); save it again "
                              "with save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise CorpusError(f"{name}: no split {split!r} in this saved dataset; splits: {', '.join(ds)}. "
                                  "Set corpus.split to one of them")
            ds = ds[split]
        return ds.to_iterable_dataset() if cfg.streaming else ds
    packaged = name in _PACKAGED_BUILDERS
    if packaged and not cfg.data_files:
        raise CorpusError(f"corpus.paths=[{name}] reads local files through the datasets library: list them in "
                          "corpus.data_files")
    missing = [f for f in cfg.data_files if "://" not in f and not any(c in f for c in "*?[") and not Path(f).exists()]
    if missing:
        raise CorpusError(f"corpus.data_files {missing} do not exist")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or datasets.config.HF_HUB_OFFLINE
    if not path.exists() and not packaged and offline:
        raise CorpusError(
            f"{name}: not a local directory, and hub downloads are off (HF_HUB_OFFLINE=1); save the dataset with "
            "`datasets.load_dataset(...).save_to_disk(DIR)` on a machine with network and set corpus.paths to DIR")
    try:  # a hub id, a local dataset directory, or a packaged builder over local data files
        return datasets.load_dataset(name, cfg.hf_config or None, split=split, data_files=list(cfg.data_files) or None,
                                     streaming=cfg.streaming)
    except ValueError as e:  # an unknown configuration or split
        raise CorpusError(f"{name}: {e}") from None
    except (ConnectionError, OSError) as e:
        raise CorpusError(f"{name}: cannot load this dataset (split {split!r}): {e}") from e


_PACKAGED_BUILDERS = ("json", "parquet", "csv", "text", "arrow")


def _read_hf(cfg: CorpusConfig) -> Iterator[tuple[str, Mapping, str]]:
    (name,) = cfg.paths
    ds = _open_hf(cfg)
    source = f"hf dataset {name}" + (f" ({cfg.hf_config})" if cfg.hf_config else "") + f" (split {cfg.split})"
    columns = ds.column_names
    if columns is not None:  # a stream of unknown features is checked on its first record instead
        ds = ds.select_columns(_columns(cfg, list(columns), source))
    for i, record in enumerate(ds):
        if columns is None and i == 0:
            _columns(cfg, list(record), source)
        yield f"{cfg.split}:{i}", record, f"{source} row {i}"


def _read_tfds(cfg: CorpusConfig) -> Iterator[tuple[str, Mapping, str]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise CorpusError("corpus.format 'tfds' needs tensorflow-datasets (no TensorFlow needed): "
                          "pip install 'fusion_jax[tfds]'") from e
    (name,) = cfg.paths
    data_dir = cfg.data_dir or None
    where_dir = f"data_dir {cfg.data_dir}" if cfg.data_dir else "the default TFDS data_dir"
    build = f"`tfds build {name} --file_format=array_record" + (f" --data_dir={cfg.data_dir}`" if cfg.data_dir else "`")
    try:
        # Never download here: a prepared array_record dataset is needed for random access.
        ds = tfds.data_source(name, split=cfg.split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise CorpusError(f"TFDS dataset {name!r} not found in {where_dir}; check corpus.paths and corpus.data_dir, "
                          f"or prepare it first with {build}") from None
    except Exception as e:
        raise CorpusError(f"cannot open TFDS dataset {name!r} split {cfg.split!r} from {where_dir}: {e} "
                          f"(prepare it with {build})") from e
    source = f"tfds dataset {name} (split {cfg.split})"
    _columns(cfg, sorted(ds.dataset_info.features.keys()), source)
    for i in range(len(ds)):
        yield f"{cfg.split}:{i}", ds[i], f"{source} row {i}"
