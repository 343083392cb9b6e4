"""Target lengths: every document of a store tokenized once with the target tokenizer, cached by fingerprints.

The loader's packing plan is built over these counts (``data/packing.py``). The file is
``<cache_dir>/doc_lengths/<key>.npy``, keyed by the store split's and the target tokenizer's fingerprints; a
MiniPile-size store is counted in spawned worker processes (:func:`~fusion_jax.workers.spawn_map`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fusion_jax.files import atomic_path, cache_root
from fusion_jax.tokenizers import load_tokenizer
from fusion_jax.workers import spawn_map

log = logging.getLogger(__name__)

_LENGTHS_VERSION = 1


def _cache_root(cache_dir: str | Path | None) -> Path:
    return cache_root() if cache_dir is None else Path(cache_dir)


def _count_tokens(tokenizer, texts) -> list[int]:
    return [len(tokenizer.encode(t).ids) for t in texts]


def _pool_state(store, tokenizer_path: str) -> tuple[Any, Any]:
    """A counting worker's state: the store and the target tokenizer, loaded once per process."""
    return store, load_tokenizer(tokenizer_path)


def _pool_count(state: tuple[Any, Any], span: tuple[int, int]) -> np.ndarray:
    """int64[e − s]: the target tokens of documents [s, e) (in a counting worker)."""
    store, tok = state
    docs = store.__getitems__(range(*span)) if hasattr(store, "__getitems__") else [store[i] for i in range(*span)]
    return np.asarray(_count_tokens(tok, (d.text for d in docs)), np.int64)


def _lengths_path(store, tokenizer, cache_dir: str | Path | None) -> Path:
    key = hashlib.sha256(
        f"fusion_jax.doc_lengths.v{_LENGTHS_VERSION}\0{store.fingerprint}\0{getattr(store, 'split', '')}\0"
        f"{tokenizer.fingerprint}".encode()
    ).hexdigest()[:32]
    return _cache_root(cache_dir) / "doc_lengths" / f"{key}.npy"


def _read_cached(path: Path, n: int) -> np.ndarray | None:
    """The cached int64[n] counts, or None (missing, or unusable: logged) to count again."""
    if not path.is_file():
        return None
    try:
        lengths = np.load(path, allow_pickle=False)
        if lengths.shape == (n,) and lengths.dtype == np.int64 and (lengths >= 0).all():
            return lengths
        log.warning("document lengths cache %s holds %s%s, expected int64[%d]; recounting", path,
                    lengths.dtype, list(lengths.shape), n)
    except (OSError, ValueError) as e:
        log.warning("document lengths cache %s is unreadable (%s); recounting", path, e)
    return None


def _count(store, tokenizer, tokenizer_path, workers: int, progress: bool, chunk: int) -> np.ndarray:
    """int64[N]: count every document, in ``chunk``-document spans (in worker processes when asked)."""
    n = len(store)
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    bar = _progress(total=n, desc=f"target tokens ({tokenizer.name})", disable=not progress)
    parts = []
    try:
        if workers > 0 and tokenizer_path is not None and len(spans) > 1:
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
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def target_lengths(store, tokenizer, tokenizer_path: str | Path | None = None, cache_dir: str | Path | None = None,
                   workers: int = 0, progress: bool = True, chunk: int = 2048) -> np.ndarray:
    """int64[N]: target tokens of every document of ``store`` (EOS *not* counted), cached by fingerprints.

    The file is ``<cache_dir>/doc_lengths/<sha256(store fingerprint, split, tokenizer fingerprint)[:32]>.npy``.
    ``workers > 0`` (and ``tokenizer_path``) tokenizes in that many spawned processes (for MiniPile-size stores).
    """
    path = _lengths_path(store, tokenizer, cache_dir)
    lengths = _read_cached(path, len(store))
    if lengths is not None:
        return lengths
    lengths = _count(store, tokenizer, tokenizer_path, workers, progress, chunk)
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
