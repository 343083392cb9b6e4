"""Alignment audit: how much of a teacher's next-token mass each alignment mode carries onto the target's tokens.

No model is run. The teacher is an **oracle**: at every source position its top-1 (probability 1) is the source
text's actual next token. The shares are therefore what an always-right teacher would transfer; they measure the
alignment and the vocabulary map, not a real model (a real teacher spreads its mass over its top-k).

Per source → target pair and per mode, each target position t that has a next token (row t predicts target token
t+1) falls in one category:

* ``default`` mode (``align.transfer.transfer_topk`` with the ``prefix`` vocab map): ``exact`` (the mapped target
  token has the same bytes as the source's next token), ``prefix`` (it is a strict byte-prefix), else dropped:
  ``unmapped`` (a source row predicts from the same text but its next token maps to nothing, e.g. a special token) or
  ``fallback`` (no source row predicts from the same text: one-hot on the next target token).
* ``in_context`` mode (the default transfer with ``continuation`` and ``in_context``, ``align.continuation``): rows
  inside source tokens too, and the text's next source token mapped to the target's next token. ``exact`` (the row
  lands on the target's next token), ``other`` (a teacher row that lands elsewhere), else dropped as above.
* ``fusellm`` mode (``align.fusellm.FuseLLMPair.transfer`` with DTW and ``soft``/MinED, as the official code):
  ``exact`` (EM: the rewritten source string is the mapped target string), ``mined`` (reached only through the MinED
  map, a different string), else dropped: ``unmapped`` (accepted, nothing mapped) or ``fallback`` (the official
  one-hot: the DTW pair is not 1:1 or not accepted).

``agrees`` is the share of positions where the transferred oracle lands on the target's actual next token.

Everything here is a pure function over tokenizers and bytes returning dataclasses of plain numbers;
:mod:`fusion_jax.align.report` prints them (``python -m fusion_jax.align audit``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from fusion_jax.align.bytes import GROUP_KINDS, align_bytes
from fusion_jax.align.continuation import continuation_tables
from fusion_jax.align.fusellm import FuseLLMPair
from fusion_jax.align.transfer import ROW_ONEHOT, ROW_TEACHER, matching_positions, transfer_topk
from fusion_jax.align.vocab import vocab_map
from fusion_jax.errors import InputError
from fusion_jax.tokenizers import Encoding, TokenizationError, Tokenizer, load_tokenizer

__all__ = [
    "AuditReport", "CATEGORIES", "CategoryCoverage", "Document", "MODES", "MappingCount", "ModeStats",
    "ORACLE_NOTE", "PairReport", "VocabStats", "audit", "audit_pair", "load_documents",
    "token_categories", "vocab_stats",
]

ORACLE_NOTE = (
    "oracle teacher: at each source position the teacher's top-1 (probability 1) is the source's actual next "
    "token; the mass shown is what an always-right teacher would transfer, not a real model's mass"
)
MODES: tuple[str, ...] = ("default", "in_context", "fusellm")
APPROX_NAME = {"default": "prefix", "in_context": "other", "fusellm": "mined"}  # the second mass category per mode
CATEGORIES: tuple[str, ...] = ("all", "special", "digits", "whitespace", "non_ascii")
# Per-position outcome codes.
EXACT, APPROX, UNMAPPED, FALLBACK = 0, 1, 2, 3
# End-of-document tokens, looked up among the special ids in this order (the official pipeline feeds
# `text + eos_token`, no BOS).


# ---------------------------------------------------------------------------------------------------------------
# Documents


@dataclasses.dataclass(frozen=True)
class Document:
    """One audit document: whole lines of one file with at most ``max_tokens`` target tokens.

    path: the file; offset: byte offset of ``data`` in it; target: the target's encoding of ``data`` (no EOS).
    """

    path: str
    offset: int
    data: bytes = dataclasses.field(repr=False)
    target: Encoding = dataclasses.field(repr=False)


def _read(path: str | Path) -> bytes:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such text file")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror or e}") from None


def _char_start(data: bytes, pos: int, lo: int) -> int:
    """The largest UTF-8 character start ≤ pos and > lo (or the next start after pos if none lies in (lo, pos])."""
    p = pos
    while p > lo and p < len(data) and (data[p] & 0xC0) == 0x80:
        p -= 1
    if p > lo:
        return p
    p = pos + 1
    while p < len(data) and (data[p] & 0xC0) == 0x80:
        p += 1
    return min(p, len(data))


def load_documents(paths: Sequence[str | Path], target: Tokenizer, max_tokens: int = 2048) -> list[Document]:
    """Read the text files and cut each into documents of whole lines with ≤ ``max_tokens`` target tokens.

    A line that alone exceeds ``max_tokens`` is cut inside, at a target token boundary moved to a UTF-8 character
    start. Raises FileNotFoundError for a missing file, ValueError naming the file and byte offset for text that
    is not UTF-8 (or that the target cannot reproduce), and ValueError when all the input is empty.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
    if not paths:
        raise ValueError("no text files given")
    docs: list[Document] = []
    for path in paths:
        data = _read(path)
        if not data:
            continue
        try:
            whole = target.encode(data)
        except TokenizationError as e:
            raise InputError(f"{path}: {e}") from None
        line_ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 0x0A) + 1
        if not len(line_ends) or line_ends[-1] != len(data):
            line_ends = np.append(line_ends, len(data))
        # Tokens of the whole-file encoding that end at or before each line end (an estimate for a document's count;
        # every document is encoded on its own and shrunk if the estimate was short).
        before = np.searchsorted(whole.byte_end, line_ends, side="right")
        start = 0
        while start < len(data):
            budget = max_tokens
            while True:
                end = _cut(data, whole, line_ends, before, start, budget)
                try:
                    enc = target.encode(data[start:end])
                except TokenizationError as e:
                    raise InputError(f"{path} (document at byte {start}): {e}") from None
                if len(enc.ids) <= max_tokens or budget == 1:  # (budget 1: as short as it gets)
                    break
                budget = max(1, budget - (len(enc.ids) - max_tokens) - max(1, budget // 16))
            docs.append(Document(str(path), start, data[start:end], enc))
            start = end
    if not docs:
        raise InputError(f"no text: {', '.join(map(str, paths))} {'is' if len(paths) == 1 else 'are'} empty")
    return docs


def _cut(data: bytes, whole: Encoding, line_ends: np.ndarray, before: np.ndarray, start: int, budget: int) -> int:
    """End offset of the document that starts at ``start``: the last line end within ``budget`` estimated tokens,
    else a UTF-8-safe cut inside the line."""
    first_tok = int(np.searchsorted(whole.byte_end, start, side="right"))
    k = int(np.searchsorted(before, first_tok + budget, side="right")) - 1
    if k >= 0 and line_ends[k] > start:
        return int(line_ends[k])
    # One line longer than the budget: cut at the end of the budget-th token from here.
    idx = min(first_tok + budget - 1, len(whole.byte_end) - 1)
    pos = int(whole.byte_end[idx]) if idx >= first_tok else start + 1
    line_end = int(line_ends[np.searchsorted(line_ends, start, side="right")])
    pos = min(max(pos, start + 1), line_end)
    return _char_start(data, pos, start)


# ---------------------------------------------------------------------------------------------------------------
# Per-tokenizer tables


def token_categories(tok: Tokenizer) -> dict[str, np.ndarray]:
    """bool[V] per coverage category of a token (by its bytes): ``special`` (special flag or no bytes), ``digits``
    (an ASCII digit), ``whitespace`` (a whitespace run: only ASCII whitespace, ≥ 2 bytes), ``non_ascii`` (a byte
    ≥ 0x80). A token can be in several. (A token with an empty span in a document also counts as special.)"""
    tb = tok.token_bytes
    V = tok.vocab_size
    out = {
        "special": np.asarray(tok.special, bool) | np.fromiter((not b for b in tb), bool, V),
        "digits": np.fromiter((any(48 <= c <= 57 for c in b) for b in tb), bool, V),
        "whitespace": np.fromiter((len(b) >= 2 and b.isspace() for b in tb), bool, V),
        "non_ascii": np.fromiter((any(c >= 0x80 for c in b) for b in tb), bool, V),
    }
    return out


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class VocabStats:
    """How a vocab map sends the source ids (by bytes): ``same`` bytes, target a strict ``prefix`` of the source,
    ``other`` (different bytes), ``unmapped`` (−1); ``specials_mapped`` of ``specials`` special source ids map to
    something. ``string_matches``: ids whose rewritten piece is a target piece (EM; fusellm only, else −1)."""

    method: str
    vocab_size: int
    same: int
    prefix: int
    other: int
    unmapped: int
    specials: int
    specials_mapped: int
    string_matches: int = -1


@dataclasses.dataclass(frozen=True)
class MappingCount:
    """One source token seen as the oracle's next token at transfer positions, and where its mass went."""

    source_id: int
    target_id: int          # −1: dropped
    source: str             # display: repr of the decoded bytes, or the special's piece
    target: str
    source_piece: str
    target_piece: str
    count: int
    bytes_lost: int         # source bytes the target token does not carry: the rest after a byte-prefix target;
                            # all of them if dropped or mapped to bytes that are not a prefix


@dataclasses.dataclass(frozen=True)
class CategoryCoverage:
    """Target positions whose next token is in a category: ``count``, and the share with a teacher row and the share
    where the transferred oracle agrees with the next target token."""

    count: int
    teacher: float
    agrees: float


@dataclasses.dataclass(frozen=True)
class ModeStats:
    """One mode over all documents of a pair. ``counts``: positions per outcome (``exact``, ``prefix``|``mined``,
    ``unmapped``, ``fallback``); ``mass``: shares of the oracle mass (``exact``, ``prefix``|``mined``, ``dropped``;
    sum 1); ``agrees``: share of positions where it lands on the next target token; ``matched``: positions where a
    source row was used (default: same text; fusellm: DTW 1:1 and accepted); ``worst``: most frequent lossy
    mappings (default: bytes lost or dropped; fusellm: different bytes), most frequent first."""

    mode: str
    positions: int
    matched: int
    teacher: int
    fallback: int
    counts: dict[str, int]
    mass: dict[str, float]
    agrees: float
    worst: list[MappingCount]
    coverage: dict[str, CategoryCoverage]


@dataclasses.dataclass(frozen=True)
class PairReport:
    source: str
    target: str
    source_fingerprint: str
    target_fingerprint: str
    eos: tuple[str, str] | None          # (source piece, target piece) appended to each document, or None
    documents: int
    source_tokens: int                   # text tokens (no EOS)
    target_tokens: int
    bytes: int
    positions: int                       # target positions with a next token (EOS included as a next token)
    group_counts: dict[str, int]         # target tokens by their byte group's kind
    groups: dict[str, float]             # … as shares (sum 1)
    vocab: list[VocabStats]
    modes: dict[str, ModeStats]
    seconds: float


@dataclasses.dataclass(frozen=True)
class AuditReport:
    oracle: str
    target: str
    texts: list[str]
    documents: int
    bytes: int
    max_tokens: int
    pairs: list[PairReport]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Computation


def _display(tok: Tokenizer, i: int) -> str:
    """A token for people: the repr of its text (``'\\n'``, ``' ventricular'``, ``' '×16``), or ``<special PIECE>``."""
    if i < 0:
        return "(dropped)"
    b = tok.token_bytes[i]
    if tok.special[i] or not b:
        return f"<special {tok.pieces[i] or i}>"
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        return repr(b)
    if len(text) >= 4 and len(set(text)) == 1 and text.isspace():
        return f"{text[0]!r}×{len(text)}"  # a long whitespace run: ' '×17
    return repr(text)


def _same_and_prefix(src: Tokenizer, tgt: Tokenizer, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """→ (same bool[V_src], strict_prefix bool[V_src]) of target bytes vs source bytes under ``table``."""
    same = np.zeros(src.vocab_size, bool)
    prefix = np.zeros(src.vocab_size, bool)
    for i, j in enumerate(table.tolist()):
        if j < 0:
            continue
        a, b = src.token_bytes[i], tgt.token_bytes[j]
        same[i] = a == b
        prefix[i] = bool(b) and len(b) < len(a) and a.startswith(b)
    return same, prefix


def vocab_stats(src: Tokenizer, tgt: Tokenizer, table: np.ndarray, method: str,
                string_matches: int = -1) -> VocabStats:
    """Vocabulary-level summary of a map ``table`` int32[V_src] (−1 = unmapped) → VocabStats."""
    table = np.asarray(table)
    same, prefix = _same_and_prefix(src, tgt, table)
    mapped = table >= 0
    special = np.asarray(src.special, bool)
    return VocabStats(
        method=method, vocab_size=src.vocab_size, same=int(same.sum()), prefix=int(prefix.sum()),
        other=int((mapped & ~same & ~prefix).sum()), unmapped=int((~mapped).sum()), specials=int(special.sum()),
        specials_mapped=int((special & mapped).sum()), string_matches=string_matches,
    )


def _oracle(src_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 of an always-right teacher: row s → (src_ids[s+1], log-prob 0); the last row has nothing (−inf pad)."""
    n = len(src_ids)
    ids = np.zeros((n, 1), np.int32)
    lp = np.full((n, 1), -np.inf, np.float32)
    ids[:-1, 0] = src_ids[1:]
    lp[:-1, 0] = 0.0
    return ids, lp


def _default_doc(src_ids, src_be, tgt_ids, tgt_be, pmap, pmap_same):
    """Default mode on one document → (code, x, mapped, agree) over target positions 0..m−2."""
    n = len(src_ids)
    oid, olp = _oracle(src_ids)
    rows = transfer_topk(src_be, tgt_be, tgt_ids, oid, olp, pmap, fallback="onehot_next")
    pos = matching_positions(src_be, tgt_be)[:-1]
    has_oracle = (pos >= 0) & (pos < n - 1)
    x = np.where(has_oracle, src_ids[np.clip(pos + 1, 0, n - 1)], -1)
    teacher = has_oracle & (rows.kind[:-1] == ROW_TEACHER)
    mapped = np.where(teacher, rows.ids[:-1, 0], -1)
    xs = np.maximum(x, 0)
    code = np.full(len(x), FALLBACK, np.int8)
    code[has_oracle] = UNMAPPED
    code[teacher] = np.where(pmap_same[xs] & (mapped == pmap[xs]), EXACT, APPROX)[teacher]
    agree = teacher & (mapped == tgt_ids[1:])
    return code, x, mapped, agree


def _in_context_doc(src_ids, src_be, tgt_ids, tgt_be, pmap, tables):
    """in_context mode on one document → (code, x, mapped, agree) over target positions 0..m−2; x is the source
    token the oracle's row predicts (the next one at a matched position, the one holding the position inside it)."""
    n = len(src_ids)
    oid, olp = _oracle(src_ids)
    rows = transfer_topk(src_be, tgt_be, tgt_ids, oid, olp, pmap, fallback="onehot_next", continuation=tables,
                         src_ids=src_ids, in_context=True)
    pos = matching_positions(src_be, tgt_be)[:-1]
    inside = np.clip(np.searchsorted(np.asarray(src_be), np.asarray(tgt_be)[:-1], side="right"), 0, n - 1)
    x = np.where(pos >= 0, src_ids[np.clip(pos + 1, 0, n - 1)], src_ids[inside])
    teacher = rows.kind[:-1] == ROW_TEACHER
    mapped = np.where(teacher, rows.ids[:-1, 0], -1)
    agree = teacher & (mapped == tgt_ids[1:])
    code = np.where(agree, EXACT, np.where(teacher, APPROX, FALLBACK)).astype(np.int8)
    return code, x, mapped, agree


def _fusellm_doc(pair: FuseLLMPair, src_ids, tgt_ids):
    """fusellm mode (DTW + soft/MinED) on one document → (code, x, mapped, agree) over target positions 0..m−2."""
    n, m = len(src_ids), len(tgt_ids)
    oid, olp = _oracle(src_ids)
    alignment = pair.align(src_ids, tgt_ids)
    first, _ = alignment.tgt_spans(m)
    rows = pair.transfer(src_ids, tgt_ids, oid, olp, vocab_align="soft", alignment=alignment)
    first = first[:-1]
    accepted = rows.kind[:-1] != ROW_ONEHOT
    has_oracle = accepted & (first < n - 1)   # the last source row predicts nothing
    x = np.where(has_oracle, src_ids[np.clip(first + 1, 0, n - 1)], -1)
    teacher = has_oracle & (rows.kind[:-1] == ROW_TEACHER)
    mapped = np.where(teacher, rows.ids[:-1, 0], -1)
    code = np.full(len(x), FALLBACK, np.int8)
    code[has_oracle] = UNMAPPED
    code[teacher] = np.where(pair.hard_map[np.maximum(x, 0)] >= 0, EXACT, APPROX)[teacher]
    agree = teacher & (mapped == tgt_ids[1:])
    return code, x, mapped, agree


def _worst(src: Tokenizer, tgt: Tokenizer, x: np.ndarray, mapped: np.ndarray, top: int) -> list[MappingCount]:
    """Most frequent (source id → target id) among the given positions, ties by bytes lost then source id."""
    if not len(x) or top <= 0:
        return []
    pairs, counts = np.unique(np.stack([x, mapped], axis=1), axis=0, return_counts=True)
    entries = []
    for (i, j), c in zip(pairs.tolist(), counts.tolist()):
        sb = src.token_bytes[i]
        lost = len(sb) - (len(tgt.token_bytes[j]) if j >= 0 and sb.startswith(tgt.token_bytes[j]) else 0)
        entries.append(MappingCount(
            source_id=i, target_id=j, source=_display(src, i), target=_display(tgt, j), source_piece=src.pieces[i],
            target_piece=tgt.pieces[j] if j >= 0 else "", count=c, bytes_lost=lost,
        ))
    entries.sort(key=lambda e: (-e.count, -e.bytes_lost, e.source_id, e.target_id))
    return entries[:top]


def _mode_stats(mode, code, x, mapped, agree, cats, src, tgt, top, worst_mask) -> ModeStats:
    positions = len(code)
    counts_arr = np.bincount(code, minlength=4)
    approx = APPROX_NAME[mode]
    counts = {"exact": int(counts_arr[EXACT]), approx: int(counts_arr[APPROX]),
              "unmapped": int(counts_arr[UNMAPPED]), "fallback": int(counts_arr[FALLBACK])}
    share = (lambda c: c / positions) if positions else (lambda c: 0.0)
    teacher = code <= APPROX
    mass = {"exact": share(counts["exact"]), approx: share(counts[approx]),
            "dropped": share(counts["unmapped"] + counts["fallback"])}
    coverage = {}
    for name, mask in cats.items():
        c = int(mask.sum())
        coverage[name] = CategoryCoverage(
            count=c, teacher=float(teacher[mask].sum() / c) if c else 0.0,
            agrees=float(agree[mask].sum() / c) if c else 0.0,
        )
    return ModeStats(
        mode=mode, positions=positions, matched=int((code != FALLBACK).sum()), teacher=int(teacher.sum()),
        fallback=int((~teacher).sum()), counts=counts, mass=mass, agrees=share(int(agree.sum())),
        worst=_worst(src, tgt, x[worst_mask], mapped[worst_mask], top), coverage=coverage,
    )


def audit_pair(
    src: Tokenizer,
    tgt: Tokenizer,
    documents: Sequence[Document],
    modes: Sequence[str] = MODES,
    top: int = 10,
    eos: bool = True,
    cache_dir: str | Path | None = None,
    prefix_table: np.ndarray | None = None,
    mined_table: np.ndarray | None = None,
) -> PairReport:
    """Audit one source → target pair over ``documents`` (from :func:`load_documents` with this target).

    modes: any of ``MODES``; top: worst mappings listed per mode; eos: append each tokenizer's EOS to every document
    (as the official pipeline does) when both have one (``Tokenizer.eos_id``); cache_dir: for the vocab maps;
    prefix_table / mined_table: precomputed ``vocab_map`` tables (else loaded or built, cached).
    """
    t0 = time.perf_counter()
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    src_eos, tgt_eos = (src.eos_id, tgt.eos_id) if eos else (None, None)
    if src_eos is None or tgt_eos is None:
        src_eos = tgt_eos = None
    maps = _vocab_maps(src, tgt, modes, cache_dir, prefix_table, mined_table)
    walk = _walk_documents(src, tgt, documents, modes, maps, with_eos=src_eos is not None)
    y, cats = _next_token_categories(tgt, walk)
    mode_stats = {}
    for mode in modes:
        code, x, mapped, agree = (np.concatenate(a) for a in zip(*walk.per_mode[mode]))
        worst_mask = _worst_mask(mode, code, x, mapped, src, tgt)
        mode_stats[mode] = _mode_stats(mode, code, x, mapped, agree, cats, src, tgt, top, worst_mask)

    group_counts = walk.group_counts
    total = int(group_counts.sum())
    return PairReport(
        source=src.name, target=tgt.name, source_fingerprint=src.fingerprint, target_fingerprint=tgt.fingerprint,
        eos=(src.pieces[src_eos], tgt.pieces[tgt_eos]) if src_eos is not None else None,
        documents=len(documents), source_tokens=walk.source_tokens, target_tokens=walk.target_tokens,
        bytes=walk.bytes, positions=len(y),
        group_counts={k: int(c) for k, c in zip(GROUP_KINDS, group_counts)},
        groups={k: (float(c) / total if total else 0.0) for k, c in zip(GROUP_KINDS, group_counts)},
        vocab=maps.vocab, modes=mode_stats, seconds=time.perf_counter() - t0,
    )


@dataclasses.dataclass
class _VocabMaps:
    """The vocab maps the modes need: ``prefix`` (default mode; ``same``: the source ids mapped to the same bytes)
    and the FuseLLM pair with its MinED map (fusellm mode), None for a mode not audited, and their stats."""

    prefix: np.ndarray | None = None
    same: np.ndarray | None = None
    pair: FuseLLMPair | None = None
    vocab: list[VocabStats] = dataclasses.field(default_factory=list)


def _vocab_maps(src: Tokenizer, tgt: Tokenizer, modes: Sequence[str], cache_dir: str | Path | None,
                prefix_table: np.ndarray | None, mined_table: np.ndarray | None) -> _VocabMaps:
    maps = _VocabMaps()
    if "default" in modes or "in_context" in modes:
        maps.prefix = prefix_table if prefix_table is not None else vocab_map(src, tgt, "prefix", cache_dir=cache_dir)
        maps.same, _ = _same_and_prefix(src, tgt, maps.prefix)
        maps.vocab.append(vocab_stats(src, tgt, maps.prefix, "prefix"))
    if "fusellm" in modes:
        mined = mined_table if mined_table is not None else vocab_map(src, tgt, "mined", cache_dir=cache_dir)
        maps.pair = FuseLLMPair(src, tgt, mined)
        maps.vocab.append(vocab_stats(src, tgt, mined, "mined", string_matches=int((maps.pair.hard_map >= 0).sum())))
    return maps


@dataclasses.dataclass
class _Walk:
    """What one pass over the documents collects: token and byte counts, target tokens per byte-group kind, per
    document the target's next tokens and which of them span no bytes, and per mode each document's
    ``(code, x, mapped, agree)`` arrays."""

    per_mode: dict[str, list[tuple]]
    group_counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(len(GROUP_KINDS), np.int64))
    source_tokens: int = 0
    target_tokens: int = 0
    bytes: int = 0
    next_tokens: list[np.ndarray] = dataclasses.field(default_factory=list)
    empty: list[np.ndarray] = dataclasses.field(default_factory=list)


def _walk_documents(src: Tokenizer, tgt: Tokenizer, documents: Sequence[Document], modes: Sequence[str],
                    maps: _VocabMaps, with_eos: bool) -> _Walk:
    walk = _Walk(per_mode={m: [] for m in modes})
    for doc in documents:
        try:
            s_enc = src.encode(doc.data)
        except TokenizationError as e:
            raise InputError(f"{doc.path} (document at byte {doc.offset}): {e}") from None
        t_enc = doc.target
        walk.source_tokens += len(s_enc.ids)
        walk.target_tokens += len(t_enc.ids)
        walk.bytes += len(doc.data)
        aln = align_bytes(s_enc.byte_end, t_enc.byte_end)
        walk.group_counts += np.bincount(aln.kind[aln.tgt_group], minlength=len(GROUP_KINDS))
        src_ids, src_be = src.with_eos(s_enc) if with_eos else s_enc
        tgt_ids, tgt_be = tgt.with_eos(t_enc) if with_eos else t_enc
        walk.next_tokens.append(tgt_ids[1:])
        walk.empty.append(tgt_be[1:] == tgt_be[:-1])
        if "default" in modes:
            walk.per_mode["default"].append(_default_doc(src_ids, src_be, tgt_ids, tgt_be, maps.prefix, maps.same))
        if "in_context" in modes:
            walk.per_mode["in_context"].append(_in_context_doc(src_ids, src_be, tgt_ids, tgt_be, maps.prefix,
                                                               continuation_tables(src, tgt)))
        if "fusellm" in modes:
            walk.per_mode["fusellm"].append(_fusellm_doc(maps.pair, src_ids, tgt_ids))
    return walk


def _next_token_categories(tgt: Tokenizer, walk: _Walk) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The target's next token at every position ``y int[P]`` and, per category of ``CATEGORIES``, which positions'
    next token is in it ``bool[P]`` (a token spanning no bytes counts as special)."""
    cat_tables = token_categories(tgt)
    y = np.concatenate(walk.next_tokens) if walk.next_tokens else np.zeros(0, np.int32)
    empty_span = np.concatenate(walk.empty) if walk.empty else np.zeros(0, bool)
    return y, {
        "all": np.ones(len(y), bool),
        "special": cat_tables["special"][y] | empty_span,
        "digits": cat_tables["digits"][y],
        "whitespace": cat_tables["whitespace"][y],
        "non_ascii": cat_tables["non_ascii"][y],
    }


def _worst_mask(mode: str, code: np.ndarray, x: np.ndarray, mapped: np.ndarray, src: Tokenizer,
                tgt: Tokenizer) -> np.ndarray:
    """The positions the worst-mappings list counts: default mode, the lossy ones (prefix or unmapped); fusellm mode,
    those whose source token is mapped to a target token with different bytes."""
    if mode in ("default", "in_context"):
        return (code == APPROX) | (code == UNMAPPED)
    worst_mask = code <= APPROX
    if worst_mask.any():
        xs, ms = x[worst_mask], mapped[worst_mask]
        differs = np.fromiter(
            (src.token_bytes[i] != tgt.token_bytes[j] for i, j in zip(xs.tolist(), ms.tolist())), bool, len(xs)
        )
        worst_mask[np.flatnonzero(worst_mask)] = differs
    return worst_mask


def _load_tokenizer(tok: str | Path | Tokenizer, role: str) -> Tokenizer:
    """load_tokenizer, with a file that is not a tokenizer reported as one ValueError naming it."""
    if isinstance(tok, Tokenizer):
        return tok
    try:
        return load_tokenizer(tok)
    except FileNotFoundError:
        raise
    except Exception as e:  # JSON / protobuf decode errors, the tokenizers library's bare Exception, …
        raise InputError(f"{tok}: cannot load the {role} tokenizer ({type(e).__name__}: {e})") from None


def audit(
    sources: Sequence[str | Path | Tokenizer],
    target: str | Path | Tokenizer,
    texts: Sequence[str | Path],
    modes: Sequence[str] = MODES,
    top: int = 10,
    max_tokens: int = 2048,
    eos: bool = True,
    cache_dir: str | Path | None = None,
) -> AuditReport:
    """Load the tokenizers (paths or :class:`Tokenizer`), cut the texts into documents and audit every source →
    target pair → AuditReport."""
    if not sources:
        raise ValueError("at least one source tokenizer is needed")
    tgt = _load_tokenizer(target, "target")
    srcs = [_load_tokenizer(s, "source") for s in sources]
    docs = load_documents(texts, tgt, max_tokens)
    pairs = [audit_pair(s, tgt, docs, modes=modes, top=top, eos=eos, cache_dir=cache_dir) for s in srcs]
    return AuditReport(
        oracle=ORACLE_NOTE, target=tgt.name, texts=[str(t) for t in texts], documents=len(docs),
        bytes=sum(len(d.data) for d in docs), max_tokens=max_tokens, pairs=pairs,
    )
