"""Import official FuseLLM feature datasets (``datasets.save_to_disk`` output) as a document store + teacher caches.

The official pipeline (``reference/fusellm.md`` §2, §7) stores, per example of the base (= target) tokenization:

====================================================  ============================================================
column                                                content
====================================================  ============================================================
``input_ids``                                         base tokens, no BOS, documents ended (separated) by EOS
``per_step_logits`` / ``per_step_indices``            the base model's own top-k: raw logits (fp16), [n][10]
``per_step_aligned_logits_{j}`` / ``..._indices_{j}`` teacher j aligned onto base positions and base ids: 0..10 raw
                                                      logits per position (a one-hot fallback is ``[1.0]``, an empty
                                                      ``hard`` row is ``[]``)
``metric_ce``, ``metric_ce_aligned_{j}``              sequence CE, one float per row (per block after packing)
``attention_mask``, ``labels``, others                ignored
====================================================  ============================================================

(after ``token_alignment.py``, step 3b: one row per document; after ``packing.py``, step 4: one row per block.)

:func:`run_import` (an :class:`~fusion_jax.config.schema.ImportConfig`; :func:`import_fusellm` takes the same
settings as arguments) writes, under ``output_dir``:

* ``documents/``: a document store (``data/documents.py``) with one document per dataset row, all in one split. The
  text is the row's tokens' bytes (``Tokenizer.token_bytes`` of the *target* tokenizer), with the dummy-prefix space
  of a SentencePiece first token dropped exactly as ``Tokenizer.encode`` drops it; special tokens (EOS) own empty
  spans and contribute no text. A packed block cut inside a byte-fallback character leaves partial UTF-8 bytes at its
  ends: those byte tokens get empty spans and their bytes are left out of the text (counted as ``utf8_trimmed_rows``).
* ``teacher_base/`` (from ``per_step_*``) and ``teacher_aligned_{j}/`` (from ``per_step_aligned_*_{j}``): one teacher
  cache each (``data/teacher_cache.py``), in the **target** tokenization: ``ids`` = ``input_ids``, ``byte_end`` from the
  token bytes, ``topk_ids`` = the row's ids padded with id 0 / −inf to ``k`` = the teacher's longest row (≥ 1),
  ``topk_logprobs`` = log_softmax over the row's own stored logits, ``token_ce`` NaN (the official data has none),
  ``doc_ce`` = the row's ``metric_ce*``. Manifests carry what a run checks (target tokenizer fingerprint, ``k``,
  ``append_eos`` = true, documents fingerprint) and ``model`` = ``{"imported_from": dataset, "column": ...}``.
* ``import.json``: what was imported, counts of everything unusual (below), and the config to train on it.

Why a log_softmax over the stored entries is exact: the official collator turns each row into
``softmax(logits / T)`` over exactly the stored entries (§5.1). log_softmax shifts a row by a constant, and
``softmax((x + c) / T) = softmax(x / T)`` for any per-row constant ``c`` — so the distribution the collator builds, at
every temperature, is unchanged; only the pads (−inf) and the storage's rounding differ. The stored log-probs are
normalized over the kept top-k, not over the full vocabulary (the official data has no full-vocabulary mass).

Rows are sorted in descending order of logit, as a cache requires. ``torch.topk`` and the official alignment already
give descending rows; a row that is not (e.g. edited data) is sorted stably (equal logits keep their order) and
counted as ``resorted_rows``. An empty row (``[]``, an official ``hard`` miss) becomes an all −inf row: no teacher
row there (the official collator substitutes the base model's row; our loader's ``fallback`` decides: ``mask`` keeps
it empty, ``onehot_next`` puts a one-hot on the next token).

Training on the import: the target tokenizer *is* the teachers' tokenizer, so the loader aligns in ``bytes`` mode 1:1
(every target row ends where the teacher row ends) with ``vocab_map: identity``, which keeps every candidate id as
the official collator does. (``exact`` would differ on two kinds of id that official rows may hold: special ids
other than EOS — Llama-2 ``<unk>`` = the pad id 0, ``<s>`` = 1 — map to −1 and are dropped, and byte-fallback pieces
with the bytes of a regular piece — ``<0x41>`` = ``A`` — move to that piece; ``import.json`` counts both.)
The loader re-tokenizes each document's text; where that differs from ``input_ids`` (a non-canonical
tokenization, a block starting inside a word, EOS inside a packed block) the byte alignment still matches every row
that ends at the same byte offset and rank, and the others fall back — ``import.json`` counts such rows and positions
(``loader_alignment``) when ``check_reencode`` is on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from fusion_jax.align.transfer import matching_positions
from fusion_jax.align.vocab import exact_map
from fusion_jax.config.schema import ImportConfig
from fusion_jax.data import teacher_cache as tc
from fusion_jax.data.corpus import Document
from fusion_jax.data.documents import SPLITS, DocumentWriter
from fusion_jax.errors import InputError
from fusion_jax.files import check_replaceable, commit_directory
from fusion_jax.tokenizers import Tokenizer, load_tokenizer

__all__ = ["FuseLLMImportError", "import_fusellm", "run_import", "teacher_columns", "IMPORT_FILE"]

log = logging.getLogger(__name__)

IMPORT_FILE = "import.json"
FORMAT = "fusion_jax.fusellm_import"
VERSION = 1
DOMAIN = "fusellm"
_ALIGNED = re.compile(r"^per_step_aligned_logits_(\d+)$")


class FuseLLMImportError(InputError):
    """An official dataset that cannot be imported; the message names the column, row and position."""


@dataclasses.dataclass(frozen=True)
class TeacherColumns:
    """The columns of one teacher in the official dataset."""

    name: str     # "base" | "aligned_{j}"
    logits: str
    indices: str
    metric: str

    @property
    def directory(self) -> str:
        return f"teacher_{self.name}"


def teacher_columns(columns: list[str]) -> list[TeacherColumns]:
    """The teachers in a dataset with these columns: base first, then aligned_0, aligned_1, … (by index).

    Raises FuseLLMImportError naming every missing column and listing the present ones."""
    present = set(columns)
    aligned = sorted({int(m.group(1)) for c in columns if (m := _ALIGNED.match(c))}
                     | {int(c.rsplit("_", 1)[1]) for c in columns if re.match(r"^per_step_aligned_indices_\d+$", c)})
    teachers = [TeacherColumns("base", "per_step_logits", "per_step_indices", "metric_ce")]
    teachers += [TeacherColumns(f"aligned_{j}", f"per_step_aligned_logits_{j}", f"per_step_aligned_indices_{j}",
                                f"metric_ce_aligned_{j}") for j in aligned]
    need = ["input_ids"] + [c for t in teachers for c in (t.logits, t.indices, t.metric)]
    missing = [c for c in need if c not in present]
    if missing:
        raise FuseLLMImportError(
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; the dataset has "
            f"{', '.join(sorted(present)) or 'no columns'}"
        )
    return teachers


# ------------------------------------------------------------------------------------------------ reading batches


@dataclasses.dataclass
class _TeacherBatch:
    row_len: np.ndarray    # int64[B] positions per row (== tokens)
    cand_len: np.ndarray   # int64[P] candidates per position (P = all positions of the batch)
    logits: np.ndarray     # float64[C] flat
    indices: np.ndarray    # int64[C] flat
    metric: np.ndarray     # float64[B]


@dataclasses.dataclass
class _Batch:
    row0: int              # global index of the first row
    row_len: np.ndarray    # int64[B]
    ids: np.ndarray        # int64[P] flat input_ids
    teachers: list[_TeacherBatch]


def _np(arr) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _list_lengths(col, name: str, row0: int) -> np.ndarray:
    import pyarrow.compute as pc

    if col.null_count:
        bad = int(np.flatnonzero(_np(col.is_null()))[0])
        raise FuseLLMImportError(f"row {row0 + bad}: {name} is null")
    return _np(pc.list_value_length(col)).astype(np.int64)


def _first_row_of(position: int, row_len: np.ndarray) -> tuple[int, int]:
    """flat position → (row within the batch, position within the row)."""
    ends = np.cumsum(row_len)
    r = int(np.searchsorted(ends, position, side="right"))
    return r, int(position - (ends[r] - row_len[r]))


def _column(table, name: str):
    """Column ``name`` of an Arrow table as one (unchunked) array."""
    import pyarrow as pa

    c = table.column(name)
    return c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c


def _check_ids(values: np.ndarray, row_len: np.ndarray, cand_len: np.ndarray | None, name: str, row0: int,
               vocab_size: int) -> None:
    """Every id of ``values`` (flat per position, or per candidate with ``cand_len``) is in the target vocabulary."""
    bad = np.flatnonzero((values < 0) | (values >= vocab_size))
    if not bad.size:
        return
    i = int(bad[0])
    pos = i if cand_len is None else int(np.searchsorted(np.cumsum(cand_len), i, side="right"))
    r, p = _first_row_of(pos, row_len)
    where = f"row {row0 + r} position {p}"
    raise FuseLLMImportError(
        f"{where}: {name} holds id {int(values[i])}, outside the target vocabulary of {vocab_size} ids (the "
        "dataset was made with another tokenizer, or the teacher's logits are wider than its tokenizer — "
        "e.g. Qwen's padded embedding — and a top-k candidate is a padding id): give the tokenizer the dataset "
        "was built with"
    )


def _read_ids(table, row0: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` → (tokens per row int64[B], flat ids int64[P]), none empty, every id in the vocabulary."""
    import pyarrow.compute as pc

    ids_col = _column(table, "input_ids")
    row_len = _list_lengths(ids_col, "input_ids", row0)
    empty = np.flatnonzero(row_len == 0)
    if empty.size:
        raise FuseLLMImportError(f"row {row0 + int(empty[0])}: input_ids is empty (nothing to import)")
    ids = _np(pc.list_flatten(ids_col)).astype(np.int64)
    _check_ids(ids, row_len, None, "input_ids", row0, vocab_size)
    return row_len, ids


def _check_positions(c, name: str, row_len: np.ndarray, row0: int) -> None:
    """A per-position column has one entry per token of its row."""
    n_pos = _list_lengths(c, name, row0)
    bad = np.flatnonzero(n_pos != row_len)
    if bad.size:
        r = int(bad[0])
        hint = ""
        if n_pos[r] > row_len[r]:
            hint = (" (per_step_* padded to model_max_length, as forward_for_logits.py stores them? "
                    "token_alignment.py cuts them to len(input_ids))")
        raise FuseLLMImportError(
            f"row {row0 + r}: {name} has {int(n_pos[r])} positions but input_ids has {int(row_len[r])} "
            f"tokens{hint}"
        )


def _read_candidates(t: TeacherColumns, lg, ix, row_len: np.ndarray, row0: int, vocab_size: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A teacher's logits and indices columns → (candidates per position int64[P], logits float64[C],
    indices int64[C]), checked: as many logits as indices, ≤ 255 per position, integer in-vocabulary ids, finite."""
    import pyarrow.compute as pc

    lg_inner, ix_inner = pc.list_flatten(lg), pc.list_flatten(ix)
    cand_len = _list_lengths(lg_inner, t.logits, row0)
    ix_len = _list_lengths(ix_inner, t.indices, row0)
    bad = np.flatnonzero(cand_len != ix_len)
    if bad.size:
        r, p = _first_row_of(int(bad[0]), row_len)
        raise FuseLLMImportError(
            f"row {row0 + r} position {p}: {t.logits} has {int(cand_len[bad[0]])} entries but {t.indices} has "
            f"{int(ix_len[bad[0]])}"
        )
    if cand_len.size and cand_len.max() > 255:
        r, p = _first_row_of(int(np.argmax(cand_len)), row_len)
        raise FuseLLMImportError(f"row {row0 + r} position {p}: {int(cand_len.max())} candidates; at most 255 "
                                 "per position can be stored")
    logits = _np(pc.list_flatten(lg_inner)).astype(np.float64)
    indices = _np(pc.list_flatten(ix_inner))
    if indices.dtype.kind == "f":
        if not np.array_equal(indices, np.round(indices)):
            raise FuseLLMImportError(f"{t.indices} holds non-integer values")
    indices = indices.astype(np.int64)
    _check_ids(indices, row_len, cand_len, t.indices, row0, vocab_size)
    bad = np.flatnonzero(~np.isfinite(logits))
    if bad.size:
        i = int(bad[0])
        pos = int(np.searchsorted(np.cumsum(cand_len), i, side="right"))
        r, p = _first_row_of(pos, row_len)
        raise FuseLLMImportError(
            f"row {row0 + r} position {p}: {t.logits} holds {logits[i]} (the official forward_for_logits.py "
            "asserts on NaN unless --no_assert; filter such rows out, e.g. with packing.py --fiter_nan)"
        )
    return cand_len, logits, indices


def _read_metric(table, name: str, row0: int) -> np.ndarray:
    """A sequence-CE column → float64[B] (one float per row)."""
    import pyarrow as pa

    mc = _column(table, name)
    if pa.types.is_list(mc.type) or pa.types.is_large_list(mc.type):
        raise FuseLLMImportError(f"{name} holds a list per row; one float per row is expected "
                                 "(metric_level=sequence, as the official README runs it)")
    if mc.null_count:
        bad = int(np.flatnonzero(_np(mc.is_null()))[0])
        raise FuseLLMImportError(f"row {row0 + bad}: {name} is null")
    return _np(mc).astype(np.float64)


def _read_teacher(table, t: TeacherColumns, row_len: np.ndarray, row0: int, vocab_size: int) -> _TeacherBatch:
    """One teacher's columns of a record batch → its validated flat arrays."""
    lg, ix = _column(table, t.logits), _column(table, t.indices)
    for name, c in ((t.logits, lg), (t.indices, ix)):
        _check_positions(c, name, row_len, row0)
    cand_len, logits, indices = _read_candidates(t, lg, ix, row_len, row0, vocab_size)
    metric = _read_metric(table, t.metric, row0)
    return _TeacherBatch(row_len, cand_len, logits, indices, metric)


def _read_batch(table, teachers: list[TeacherColumns], row0: int, vocab_size: int) -> _Batch:
    """One Arrow record batch → validated flat numpy arrays (every bad-input check names the row)."""
    row_len, ids = _read_ids(table, row0, vocab_size)
    out = [_read_teacher(table, t, row_len, row0, vocab_size) for t in teachers]
    return _Batch(row0, row_len, ids, out)


def _batches(ds, teachers, vocab_size: int, batch_rows: int) -> Iterator[_Batch]:
    cols = ["input_ids"] + [c for t in teachers for c in (t.logits, t.indices, t.metric)]
    row0 = 0
    for table in ds.select_columns(cols).with_format("arrow").iter(batch_size=batch_rows):
        yield _read_batch(table, teachers, row0, vocab_size)
        row0 += table.num_rows


# ------------------------------------------------------------------------------------------------ rows → records


def _padded_rows(tb: _TeacherBatch, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """→ (ids int32[P, k], logprobs float32[P, k] descending with −inf pads, resorted bool[P])."""
    P = len(tb.cand_len)
    ids = np.zeros((P, k), np.int64)
    logits = np.full((P, k), -np.inf)
    if tb.logits.size:
        pos = np.repeat(np.arange(P), tb.cand_len)
        start = np.cumsum(tb.cand_len) - tb.cand_len
        col = np.arange(len(tb.logits)) - np.repeat(start, tb.cand_len)
        ids[pos, col] = tb.indices
        logits[pos, col] = tb.logits
    order = np.argsort(-logits, axis=1, kind="stable")  # −(−inf) = +inf: pads stay last
    resorted = (order != np.arange(k)).any(axis=1)
    if resorted.any():
        ids = np.take_along_axis(ids, order, axis=1)
        logits = np.take_along_axis(logits, order, axis=1)
    top = logits[:, :1]
    filled = np.isfinite(top)
    with np.errstate(invalid="ignore", divide="ignore"):
        shifted = np.where(filled, logits - np.where(filled, top, 0.0), -np.inf)
        lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        lp = np.where(filled, shifted - np.where(filled, lse, 0.0), -np.inf)
    ids[~np.isfinite(lp)] = 0
    return ids.astype(np.int32), lp.astype(np.float32), resorted


class _TextBuilder:
    """Token ids → (text bytes, byte_end) with the target's token bytes, vectorized."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        # Text the official pipeline tokenized decodes; ids read with another vocabulary seldom do.
        self.hint = (f". The likely cause is the tokenizer: {tok.name} is not the one the dataset was built with; "
                     "give the base (target) model's tokenizer (--tokenizer)")
        self.lens = np.fromiter((len(b) for b in tok.token_bytes), np.int64, tok.vocab_size)
        self.offs = np.cumsum(self.lens) - self.lens
        self.flat = np.frombuffer(b"".join(tok.token_bytes), np.uint8)

    def __call__(self, ids: np.ndarray, where: str) -> tuple[bytes, np.ndarray, bool]:
        """→ (UTF-8 text bytes, byte_end int32[n], whether partial UTF-8 bytes at the ends were left out)."""
        lens = self.lens[ids]
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        gather = np.repeat(self.offs[ids] - (ends - lens), lens) + np.arange(total)
        data = self.flat[gather].tobytes()
        start, stop, trimmed = 0, total, False
        if self.tok.dummy_prefix and data[:1] == b" ":
            start = 1  # Tokenizer.encode: tokens that give b" " + text come from text (the dummy prefix)
        try:
            data[start:].decode("utf-8")
        except UnicodeDecodeError:
            cut_start, stop = _partial_utf8_ends(data, start)
            bounds = set(ends.tolist()) | {0}
            if (cut_start != start and cut_start not in bounds) or stop not in bounds:
                raise FuseLLMImportError(f"{where}: the tokens' bytes are not valid UTF-8 text{self.hint}") from None
            start = cut_start
            try:
                data[start:stop].decode("utf-8")
            except UnicodeDecodeError as e:
                raise FuseLLMImportError(
                    f"{where}: the tokens' bytes are not valid UTF-8 at byte offset {e.start + start}: "
                    f"{data[e.start + start:e.start + start + 4]!r}{self.hint}"
                ) from None
            trimmed = True
        byte_end = np.clip(ends - start, 0, stop - start)
        return data[start:stop], byte_end.astype(np.int32), trimmed


def _partial_utf8_ends(data: bytes, start: int) -> tuple[int, int]:
    """The bytes [a, b) of ``data[start:]`` left after cutting an incomplete UTF-8 sequence at either end (what a
    packed block cut inside a multi-byte character leaves)."""
    a = start
    while a < len(data) and a - start < 3 and 0x80 <= data[a] <= 0xBF:
        a += 1
    b = len(data)
    for back in range(1, min(4, b - a) + 1):
        c = data[b - back]
        if 0x80 <= c <= 0xBF:
            continue
        need = 2 if 0xC0 <= c <= 0xDF else 3 if 0xE0 <= c <= 0xEF else 4 if 0xF0 <= c <= 0xF7 else 1
        if need > back:
            b -= back
        break
    return a, b


def _loader_mismatch(tok: Tokenizer, text: str, ids: np.ndarray, byte_end: np.ndarray) -> tuple[int, int]:
    """How the loader will see this row: it re-tokenizes ``text`` with the target and appends EOS, then finds each
    target row's teacher row by (byte end, rank) → (target positions without a teacher row, teacher rows no target
    position uses). The EOS the loader appends to a row that did not end with one (a packed block cut inside a
    document) has no teacher row by construction and is not counted."""
    enc = tok.encode(text)
    l_end = np.append(enc.byte_end, np.int32(len(text.encode("utf-8"))))
    pos = matching_positions(byte_end, l_end)
    found = pos >= 0
    if ids[-1] != tok.eos_id:
        found[-1] = True
    return int((~found).sum()), int(len(ids) - (pos >= 0).sum())


# ------------------------------------------------------------------------------------------------ the import


def _open_dataset(dataset_dir: Path, split: str):
    import datasets
    import pyarrow as pa

    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"{dataset_dir}: no such directory (a dataset saved with datasets' save_to_disk)")
    try:
        ds = datasets.load_from_disk(str(dataset_dir))
    except FileNotFoundError as e:
        raise FuseLLMImportError(f"{dataset_dir}: not a dataset saved with save_to_disk ({e})") from None
    except (json.JSONDecodeError, pa.ArrowException) as e:  # a truncated state.json / dataset_info.json / .arrow
        raise FuseLLMImportError(f"{dataset_dir}: damaged dataset, datasets.load_from_disk failed ({e}); save it "
                                 "again with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise FuseLLMImportError(f"{dataset_dir}: no split {split!r}; the dataset has splits {', '.join(ds)}")
        ds = ds[split]
    return ds


def _check_output(out: Path, overwrite: bool) -> None:
    check_replaceable(out, overwrite, markers=(IMPORT_FILE,), what="an import output", error=FuseLLMImportError,
                      overwrite_flag="--overwrite, or overwrite=True")


def _teacher_ks(ds, teachers: list[TeacherColumns], vocab_size: int, batch_rows: int) -> tuple[dict[str, int], int]:
    """Pass 1: validate every row and size each teacher's k → ({teacher: k ≥ 1}, tokens), before anything is written."""
    k = {t.name: 1 for t in teachers}
    tokens = 0
    for b in _batches(ds, teachers, vocab_size, max(batch_rows, 256)):
        tokens += int(b.row_len.sum())
        for t, tb in zip(teachers, b.teachers):
            if tb.cand_len.size:
                k[t.name] = max(k[t.name], int(tb.cand_len.max()))
    return k, tokens


@dataclasses.dataclass(frozen=True)
class _Row:
    """One dataset row on its way into the caches: where it lies in its batch and the document it became."""

    index: int             # in the dataset (= the document's index in the store split)
    r: int                 # in its batch
    lo: int                # its positions [lo, hi) in the batch's flat arrays
    hi: int
    doc: Document
    ids: np.ndarray        # int64[n] input_ids
    byte_end: np.ndarray   # int32[n]
    num_bytes: int


class _CacheWriter:
    """Pass 2's output: the documents' teacher records, collected into cache shards of ``docs_per_shard`` documents,
    and the counts of unusual rows that ``import.json`` reports."""

    def __init__(self, cfg: ImportConfig, tok: Tokenizer, teachers: list[TeacherColumns], k: dict[str, int],
                 root: Path):
        self.cfg, self.tok, self.teachers, self.k = cfg, tok, teachers, k
        V = tok.vocab_size
        canon = exact_map(tok, tok)
        self.special_ids = canon < 0
        self.relabel_ids = (canon >= 0) & (canon != np.arange(V))
        self.stats = {t.name: {"k": k[t.name], "empty_rows": 0, "onehot_rows": 0, "resorted_rows": 0,
                               "nan_doc_ce_rows": 0, "special_candidates": 0, "relabelled_candidates": 0}
                      for t in teachers}
        self.differ = {"rows": 0, "target_positions_without_row": 0, "record_rows_unused": 0, "first_rows": []}
        self.trimmed = 0
        self.text_of = _TextBuilder(tok)
        self.dirs = {t.name: root / t.directory for t in teachers}
        for d in self.dirs.values():
            d.mkdir()
        self.pending: dict[str, list[bytes]] = {t.name: [] for t in teachers}
        self.pending_tokens: list[int] = []
        self.sidecars: dict[str, list[dict]] = {t.name: [] for t in teachers}
        self.shard = 0

    def add_batch(self, b: _Batch, writer: DocumentWriter, store_split: str, last_row: int) -> None:
        """Every row of ``b`` → a document of ``writer`` and one record per teacher (a shard written when full)."""
        rows = [_padded_rows(tb, self.k[t.name]) for t, tb in zip(self.teachers, b.teachers)]
        ends = np.cumsum(b.row_len)
        for r in range(len(b.row_len)):
            i = b.row0 + r
            lo, hi = int(ends[r] - b.row_len[r]), int(ends[r])
            ids = b.ids[lo:hi]
            data, byte_end, cut = self.text_of(ids, f"row {i}")
            self.trimmed += cut
            text = data.decode("utf-8")
            doc = Document(f"{store_split}:{i}", text, DOMAIN)
            writer.add(doc, store_split)
            if self.cfg.check_reencode:
                self._count_reencode(i, text, ids, byte_end)
            row = _Row(i, r, lo, hi, doc, ids, byte_end, len(data))
            for t, tb, padded in zip(self.teachers, b.teachers, rows):
                self._add_record(t, tb, padded, row)
            self.pending_tokens.append(len(ids))
            if len(self.pending_tokens) == self.cfg.docs_per_shard or i == last_row:
                self._write_shard()

    def _count_reencode(self, i: int, text: str, ids: np.ndarray, byte_end: np.ndarray) -> None:
        missing, unused = _loader_mismatch(self.tok, text, ids, byte_end)
        if missing or unused:
            self.differ["rows"] += 1
            self.differ["target_positions_without_row"] += missing
            self.differ["record_rows_unused"] += unused
            if len(self.differ["first_rows"]) < 10:
                self.differ["first_rows"].append(i)

    def _add_record(self, t: TeacherColumns, tb: _TeacherBatch, padded, row: _Row) -> None:
        """Teacher ``t``'s part of ``row`` (``padded``: its :func:`_padded_rows` of the batch) → its encoded record
        (pending until the shard is written) and its counts."""
        t_ids, t_lp, resorted = padded
        r, lo, hi, ids = row.r, row.lo, row.hi, row.ids
        s = self.stats[t.name]
        lp = t_lp[lo:hi]
        top_ids = t_ids[lo:hi]
        counts = tb.cand_len[lo:hi]
        s["empty_rows"] += int((counts == 0).sum())
        s["onehot_rows"] += int((counts == 1).sum())
        s["resorted_rows"] += int(resorted[lo:hi].sum())
        live = np.isfinite(lp)
        s["special_candidates"] += int((live & self.special_ids[top_ids]).sum())
        s["relabelled_candidates"] += int((live & self.relabel_ids[top_ids]).sum())
        doc_ce = float(tb.metric[r])
        s["nan_doc_ce_rows"] += int(np.isnan(doc_ce))
        rec = tc.TeacherRecord(
            doc_index=row.index, doc_id=row.doc.id, ids=ids.astype(np.int32), byte_end=row.byte_end,
            topk_ids=top_ids, topk_logprobs=lp, token_ce=np.full(len(ids), np.nan, np.float32),
            doc_ce=doc_ce, num_bytes=row.num_bytes)
        self.pending[t.name].append(tc.encode_record(rec, self.tok.vocab_size, self.cfg.logprob_format))

    def _write_shard(self) -> None:
        for t in self.teachers:
            self.sidecars[t.name].append(tc.write_shard(self.dirs[t.name], self.shard, self.pending[t.name],
                                                        self.pending_tokens))
            self.pending[t.name] = []
        self.pending_tokens, self.shard = [], self.shard + 1

    def write_manifests(self, dataset_dir: Path, store_split: str, fingerprint: str, n_rows: int) -> None:
        """Each teacher cache's manifest (written last: it makes the cache complete)."""
        cfg, tok = self.cfg, self.tok
        for t in self.teachers:
            spec = {
                "model": {"imported_from": str(dataset_dir), "split": cfg.split, "column": t.logits,
                          "indices_column": t.indices, "metric_column": t.metric},
                "tokenizer": tok.fingerprint, "tokenizer_name": tok.name, "vocab_size": tok.vocab_size,
                "k": self.k[t.name], "append_eos": True, "logprob_format": cfg.logprob_format,
                "compute_dtype": "imported", "param_dtype": "imported",
                "documents": {"fingerprint": fingerprint, "split": store_split, "num_docs": n_rows},
                "docs_per_shard": cfg.docs_per_shard,
                "imported": {"logprobs": "log_softmax over the stored top-k logits", "token_ce": "absent (NaN)",
                             "doc_ce": t.metric},
            }
            tc.write_manifest(self.dirs[t.name], spec, self.sidecars[t.name])


def _report(cfg: ImportConfig, dataset_dir: Path, out: Path, tok: Tokenizer, n_rows: int, tokens: int,
            store_split: str, fingerprint: str, cw: _CacheWriter) -> dict[str, Any]:
    """What ``import.json`` holds (module docstring)."""
    return {
        "format": FORMAT, "version": VERSION, "dataset": str(dataset_dir), "split": cfg.split, "output": str(out),
        "rows": n_rows, "tokens": tokens, "documents": {"path": str(out / "documents"), "split": store_split,
                                                      "fingerprint": fingerprint},
        "target_tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
        "teachers": {t.name: {"cache": str(out / t.directory), **cw.stats[t.name]} for t in cw.teachers},
        "utf8_trimmed_rows": cw.trimmed,
        "loader_alignment": cw.differ if cfg.check_reencode else None,
        "logprob_format": cfg.logprob_format,
    }


def _check_inputs(cfg: ImportConfig, tokenizer: Tokenizer | None, batch_rows: int) -> tuple[str, Tokenizer]:
    """The settings an import needs beyond ``cfg.validate`` → (the store split to fill, the target tokenizer)."""
    cfg.validate()
    store_split = cfg.store_split or cfg.split
    if store_split not in SPLITS:
        raise FuseLLMImportError(f"the document store holds splits {SPLITS}; give store_split= one of them "
                                 f"(split {cfg.split!r} is not)")
    if batch_rows <= 0:
        raise ValueError("batch_rows must be positive")
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    if tok.eos_id is None:
        raise FuseLLMImportError(f"target tokenizer {tok.name!r} has no EOS token; the official data ends documents "
                                 "with one and the loader appends it")
    return store_split, tok


def run_import(cfg: ImportConfig, *, tokenizer: Tokenizer | None = None, batch_rows: int = 64) -> dict[str, Any]:
    """Import the official FuseLLM feature dataset ``cfg.dataset_dir`` into ``cfg.output`` (module docstring) → the
    report also written to ``import.json``. ``tokenizer``: the loaded target tokenizer (default: load
    ``cfg.tokenizer``); ``batch_rows``: dataset rows converted at a time. The output is written as
    ``<output>.partial`` and renamed when complete."""
    store_split, tok = _check_inputs(cfg, tokenizer, batch_rows)
    dataset_dir, out = Path(cfg.dataset_dir).absolute(), Path(cfg.output).absolute()
    ds = _open_dataset(dataset_dir, cfg.split)
    teachers = teacher_columns(list(ds.column_names))
    n_rows = len(ds)
    if n_rows == 0:
        raise FuseLLMImportError(f"{dataset_dir}: the dataset ({cfg.split}) has no rows")
    k, tokens = _teacher_ks(ds, teachers, tok.vocab_size, batch_rows)
    _check_output(out, cfg.overwrite)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {"imported_from": {"format": "fusellm", "dataset": str(dataset_dir), "split": cfg.split},
            "tokenizers": {"target": {"name": tok.name, "fingerprint": tok.fingerprint}}}
    bar = tqdm(total=n_rows, unit="row", disable=not cfg.progress, desc="import")
    try:
        cw = _CacheWriter(cfg, tok, teachers, k, tmp)
        with DocumentWriter(tmp / "documents", meta) as writer:
            for b in _batches(ds, teachers, tok.vocab_size, batch_rows):
                cw.add_batch(b, writer, store_split, n_rows - 1)
                bar.update(len(b.row_len))
        bar.close()
        fingerprint = writer.meta["splits"][store_split]["fingerprint"]
        cw.write_manifests(dataset_dir, store_split, fingerprint, n_rows)
        report = _report(cfg, dataset_dir, out, tok, n_rows, tokens, store_split, fingerprint, cw)
        (tmp / IMPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        _check_output(out, cfg.overwrite)
        if out.exists():
            shutil.rmtree(out)
        commit_directory(tmp, out)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log_summary(report)
    return report


def import_fusellm(
    dataset_dir: str | Path,
    target_tokenizer: str | Path | Tokenizer,
    output_dir: str | Path,
    split: str = "train",
    *,
    store_split: str | None = None,
    docs_per_shard: int = 256,
    logprob_format: tc.LogprobFormat = "quantized",
    check_reencode: bool = True,
    batch_rows: int = 64,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`run_import` with the settings as arguments (see :class:`~fusion_jax.config.schema.ImportConfig`).

    dataset_dir: a ``save_to_disk`` directory (a Dataset, or a DatasetDict of which ``split`` is taken);
    target_tokenizer: the base model's tokenizer the dataset was built with (path or loaded ``Tokenizer``);
    output_dir: created (written as ``<output_dir>.partial`` and renamed when complete);
    store_split: the document store split to fill (default ``split``; ``train`` or ``validation``);
    logprob_format: the caches' storage (``quantized``: 37 B/token at k = 10, ≤ 1/64 nat per non-top entry;
    ``float16``: 46 B/token); check_reencode: re-tokenize each text as the loader will and count the positions it
    will not align 1:1 (``import.json`` ``loader_alignment``).
    """
    tok = target_tokenizer if isinstance(target_tokenizer, Tokenizer) else None
    cfg = ImportConfig(dataset_dir=str(dataset_dir), output=str(output_dir),
                       tokenizer=str(target_tokenizer) if tok is None else tok.name or "(loaded tokenizer)", split=split,
                       store_split=store_split, docs_per_shard=docs_per_shard, logprob_format=logprob_format,
                       check_reencode=check_reencode, overwrite=overwrite, progress=progress)
    return run_import(cfg, tokenizer=tok, batch_rows=batch_rows)


def _log_summary(report: dict) -> None:
    log.info("imported %d rows (%s tokens) from %s into %s", report["rows"], f"{report['tokens']:,}",
             report["dataset"], report["output"])
    for name, s in report["teachers"].items():
        log.info("  teacher %s: k=%d, %d empty rows, %d one-hot rows, %d rows re-sorted", name, s["k"],
                 s["empty_rows"], s["onehot_rows"], s["resorted_rows"])
        if s["special_candidates"] or s["relabelled_candidates"]:
            log.warning("  teacher %s: %d candidates on special ids (the loader's exact/prefix vocab map drops them "
                        "and renormalizes) and %d on byte-fallback ids with a regular twin (moved to the regular id)",
                        name, s["special_candidates"], s["relabelled_candidates"])
        if s["nan_doc_ce_rows"]:
            log.warning("  teacher %s: %d rows have a NaN sequence CE (doc_ce)", name, s["nan_doc_ce_rows"])
    if report["utf8_trimmed_rows"]:
        log.info("  %d rows start or end inside a multi-byte character (left out of their text)",
                 report["utf8_trimmed_rows"])
    differ = report["loader_alignment"]
    if differ and differ["rows"]:
        log.warning("  %d rows re-tokenize differently from their input_ids (first: %s): the loader's target tokens "
                    "will have %d positions without a teacher row (fallback) and %d teacher rows will go unused",
                    differ["rows"], differ["first_rows"], differ["target_positions_without_row"],
                    differ["record_rows_unused"])
