"""Vocabulary maps source → target as ``int32[V_src]`` (−1 where nothing maps), cached on disk.

Methods:

* ``prefix`` (default): the longest target token whose bytes are a prefix of the source token's bytes — the target
  token the source's prediction actually starts with. ``ĠHello`` → ``▁Hello``; a source token the target splits
  (``Ġventricular`` → ``▁vent`` if ``▁ventricular`` is not a target token); ``\\n\\n`` → ``<0x0A>``.
* ``exact``: a target token with exactly the same bytes, else −1.
* ``identity``: the same id, for a teacher that shares the target's tokenizer (the target model as its own teacher,
  imported FuseLLM features); unlike ``exact`` it keeps every special and byte-fallback id as it is.
* ``mined``: the official FuseLLM MinED map (``vocab_mapping.py::find_best_mapping``): on the raw vocabulary strings
  with the source prefix character rewritten to the target's (``Ġ`` → ``▁``), itself if that string is a target
  token, else the target token at minimum Levenshtein distance, ties → lowest target id. Specials are mapped too
  (``<|endoftext|>`` → ``Context``), exactly as the official code does.

For ``prefix`` and ``exact``, the source's EOS maps to the target's EOS (``Tokenizer.eos_id``, when both have one), other
special source tokens (empty bytes) map to −1, and where several target ids have the
same bytes the one the target tokenizer produces is chosen: a non-special added token (split out of the text before
the model runs) before a regular piece before a ``<0xNN>`` byte-fallback piece, then the lowest id. Maps are cached
as ``<cache>/vocab_maps/<method>-<src fp[:16]>-<tgt fp[:16]>.npz`` holding both full fingerprints and the format
version, which are checked on load.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Literal

import numpy as np

from fusion_jax.align.dtw import edit_distances
from fusion_jax.errors import ConfigError
from fusion_jax.files import atomic_path, cache_root
from fusion_jax.tokenizers import Tokenizer

log = logging.getLogger(__name__)

MapMethod = Literal["prefix", "exact", "mined", "identity"]
MAP_METHODS: tuple[str, ...] = ("prefix", "exact", "mined", "identity")
_FORMAT_VERSION = 1
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# Versions of the maps themselves, per method, so that a change to one rebuilds only its maps (MinED takes minutes on
# real pairs). prefix/exact 2: added tokens win ties by bytes (1 sent GPT-NeoX's whitespace runs to BPE pieces the
# tokenizer never emits).
_MAP_VERSIONS = {"prefix": 2, "exact": 2}


def _version(method: str) -> str:
    return str(_MAP_VERSIONS.get(method, _FORMAT_VERSION))


def prefix_char(tok: Tokenizer) -> str:
    """The word-start character of the raw pieces: ``Ġ`` for GPT-2 byte-level BPE, ``▁`` for SentencePiece-style
    (the official ``TOKENIZER_TO_SPECIAL_TOKEN``, generalised from two classes to tokenizer kinds)."""
    return "Ġ" if tok.kind == "byte_level" else "\u2581"


def canonical_ids_by_bytes(tok: Tokenizer) -> dict[bytes, int]:
    """bytes → the id the tokenizer produces for them, where several ids have the same bytes:

    1. a non-special added token (``Tokenizer.added``): the backend splits it out of the text before its model runs,
       so the model piece with the same bytes never occurs (GPT-NeoX-20B's ``'  '`` id 50276, not BPE ``ĠĠ``);
    2. a regular model piece;
    3. a ``<0xNN>`` byte-fallback piece (SentencePiece uses it only for bytes no piece covers);

    then the lowest id.
    """
    out: dict[bytes, int] = {}
    rank_of: dict[bytes, int] = {}
    for i, b in enumerate(tok.token_bytes):
        if tok.special[i] or not b:
            continue
        if tok.added[i]:
            rank = 0
        elif tok.kind != "byte_level" and _BYTE_PIECE.match(tok.pieces[i]):
            rank = 2
        else:
            rank = 1
        if rank < rank_of.get(b, 3):  # strict: among equal ranks the first (lowest) id stays
            out[b], rank_of[b] = i, rank
    return out


def exact_map(src: Tokenizer, tgt: Tokenizer) -> np.ndarray:
    """→ int32[V_src]: the target id with the same bytes, else −1 (special source tokens → −1)."""
    by_bytes = canonical_ids_by_bytes(tgt)
    out = np.full(src.vocab_size, -1, np.int32)
    for i, b in enumerate(src.token_bytes):
        if not src.special[i] and b:
            out[i] = by_bytes.get(b, -1)
    return _map_eos(src, tgt, out)


def _map_eos(src: Tokenizer, tgt: Tokenizer, out: np.ndarray) -> np.ndarray:
    if src.eos_id is not None and tgt.eos_id is not None:
        out[src.eos_id] = tgt.eos_id
    return out


def prefix_map(src: Tokenizer, tgt: Tokenizer) -> np.ndarray:
    """→ int32[V_src]: the longest target token whose bytes are a prefix of the source token's bytes, else −1."""
    by_bytes = canonical_ids_by_bytes(tgt)
    longest = max(map(len, by_bytes), default=0)
    out = np.full(src.vocab_size, -1, np.int32)
    for i, b in enumerate(src.token_bytes):
        if src.special[i]:
            continue
        for n in range(min(len(b), longest), 0, -1):
            j = by_bytes.get(b[:n])
            if j is not None:
                out[i] = j
                break
    return _map_eos(src, tgt, out)


def mined_map(src: Tokenizer, tgt: Tokenizer, chunk: int = 512, workers: int = -1) -> np.ndarray:
    """→ int32[V_src]: the official MinED map (module docstring); every source id maps somewhere.

    Work: one Levenshtein row per non-identical source string against all target strings (rapidfuzz ``cdist``,
    multi-threaded, in chunks of ``chunk`` rows), argmin with first-index ties.
    """
    src_char, tgt_char = prefix_char(src), prefix_char(tgt)
    # `tmp_x in base_tokens` / `min(... for y in base_tokens)` over `get_vocab()` keys in id order: for a string
    # that occurs under several ids the lowest id is the first match.
    tgt_strings = list(tgt.pieces)
    first_id: dict[str, int] = {}
    for j, s in enumerate(tgt_strings):
        first_id.setdefault(s, j)
    out = np.full(src.vocab_size, -1, np.int32)
    rewritten = [p.replace(src_char, tgt_char) for p in src.pieces]
    todo_strings: dict[str, list[int]] = {}
    for i, s in enumerate(rewritten):
        j = first_id.get(s)
        if j is not None:
            out[i] = j
        else:
            todo_strings.setdefault(s, []).append(i)
    queries = list(todo_strings)
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk]
        best = edit_distances(block, tgt_strings, workers=workers).argmin(axis=1)
        for s, j in zip(block, best):
            out[todo_strings[s]] = j
    return out


def identity_map(src: Tokenizer, tgt: Tokenizer) -> np.ndarray:
    """→ int32[V]: every id to itself; only for the same tokenizer (equal fingerprints)."""
    if src.fingerprint != tgt.fingerprint:
        raise ConfigError(
            f"the identity vocab map needs the same tokenizer on both sides; {src.name!r} and {tgt.name!r} differ "
            "(use prefix, exact or mined)"
        )
    return np.arange(src.vocab_size, dtype=np.int32)


_BUILDERS = {"prefix": prefix_map, "exact": exact_map, "mined": mined_map, "identity": identity_map}


def cache_path(src: Tokenizer, tgt: Tokenizer, method: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "vocab_maps" / f"{method}-{src.fingerprint[:16]}-{tgt.fingerprint[:16]}.npz"


def vocab_map(
    src: Tokenizer, tgt: Tokenizer, method: MapMethod = "prefix", cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> np.ndarray:
    """Build (or load from the cache) the ``method`` map src → tgt: int32[V_src], values in [−1, V_tgt).

    ``cache_dir=None`` uses :func:`fusion_jax.files.cache_root`. A cache file whose fingerprints, method, shape or value range do not match is rebuilt (with a warning), never
    trusted; writes go to a temporary file that is renamed into place, so a crash never leaves a partial map.
    """
    if method not in _BUILDERS:
        raise ValueError(f"vocab map method must be one of {MAP_METHODS}, got {method!r}")
    if not use_cache:
        return _build(src, tgt, method)
    path = cache_path(src, tgt, method, cache_root() if cache_dir is None else cache_dir)
    if path.exists():
        problem = None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = {k: str(z[k]) for k in ("method", "src_fingerprint", "tgt_fingerprint", "version")}
                table = np.asarray(z["map"])
        except Exception as e:  # unreadable / truncated file
            problem = f"unreadable ({type(e).__name__}: {e})"
        else:
            expected = {"method": method, "src_fingerprint": src.fingerprint, "tgt_fingerprint": tgt.fingerprint,
                        "version": _version(method)}
            wrong = [k for k in expected if meta[k] != expected[k]]
            if wrong:
                problem = f"its {', '.join(wrong)} do not match"
            elif table.dtype != np.int32 or table.shape != (src.vocab_size,):
                problem = f"it holds {table.dtype}{list(table.shape)}, expected int32[{src.vocab_size}]"
            elif table.size and (table.min() < -1 or table.max() >= tgt.vocab_size):
                problem = f"its ids leave [-1, {tgt.vocab_size})"
            else:
                return table
        log.warning("vocab map cache %s: %s; rebuilding it", path, problem)
    table = _build(src, tgt, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, map=table, method=method, src_fingerprint=src.fingerprint, tgt_fingerprint=tgt.fingerprint,
                 version=_version(method))
    return table


def _build(src: Tokenizer, tgt: Tokenizer, method: str) -> np.ndarray:
    t0 = time.perf_counter()
    table = _BUILDERS[method](src, tgt)
    log.info("vocab map %s %s → %s: %d ids in %.1fs (%d unmapped)", method, src.name, tgt.name, len(table),
             time.perf_counter() - t0, int((table < 0).sum()))
    return table
