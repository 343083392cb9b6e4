"""python -m fusion_jax.prepare --config FILE [--set KEY=VALUE ...] — corpus → prepared documents store.

Reads the corpus, puts each document in train or validation by a stable hash of its id (all pieces of a
document stay in one split), splits documents longer than max_tokens under any of the run's tokenizers
(FuseLLM's rule, as exact byte slices), and writes the store that capture and the loader read.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from fusion_jax.config import loader as config_loader
from fusion_jax.config.schema import PrepareConfig
from fusion_jax.data.corpus import Document, read_documents, split_of
from fusion_jax.data.documents import SPLITS, DocumentWriter
from fusion_jax.data.splitting import split_long
from fusion_jax.files import is_url
from fusion_jax.tokenizers import TokenizationError, Tokenizer, load_tokenizer
from fusion_jax.workers import spawn_map

log = logging.getLogger(__name__)


def _absolute(path: str) -> str:
    return os.path.abspath(path) if path and not is_url(path) else path


def normalised(settings: Mapping[str, Any]) -> dict:
    """A store's prepare settings (``to_dict(PrepareConfig)``, as documents.json records them) with every local path
    absolute and normal, so that ``corpus.jsonl``, ``./corpus.jsonl`` and ``/data/corpus.jsonl`` (from /data) compare
    equal. Hub ids and TFDS names stay as given. Idempotent."""
    out = copy.deepcopy(dict(settings))
    corpus = out.get("corpus")
    if isinstance(corpus, dict):
        local = corpus.get("format") in ("text", "jsonl", "parquet")
        corpus["paths"] = [_absolute(p) if local or (corpus.get("format") == "hf" and os.path.exists(p)) else p
                           for p in corpus.get("paths", [])]
        if corpus.get("data_dir"):
            corpus["data_dir"] = _absolute(corpus["data_dir"])
        corpus.pop("streaming", None)  # how the records are read, not which
        for key, before in (("hf_config", ""), ("data_files", [])):  # added later: stores made before lack them
            if corpus.get(key, before) in (before, ()):
                corpus.pop(key, None)
        if corpus.get("data_files"):
            corpus["data_files"] = [p if "://" in p else _absolute(p) for p in corpus["data_files"]]
    if "tokenizers" in out:
        out["tokenizers"] = [_absolute(p) for p in out["tokenizers"]]
    if "output" in out:
        out["output"] = _absolute(out["output"])
    return out


# One document → its pieces, or None when skipped. Worker processes keep their own tokenizers.
def _worker_state(cfg: PrepareConfig) -> tuple[list[Tokenizer], PrepareConfig]:
    return [load_tokenizer(p) for p in cfg.tokenizers], cfg


def _process(doc: Document, tokenizers: Sequence[Tokenizer], cfg: PrepareConfig) -> list[Document] | None:
    if cfg.normalize == "nfc" and not unicodedata.is_normalized("NFC", doc.text):
        doc = dataclasses.replace(doc, text=unicodedata.normalize("NFC", doc.text))
    try:
        return split_long(doc, tokenizers, cfg.max_tokens)
    except TokenizationError as e:
        if cfg.on_tokenization_error == "skip":
            return None
        raise TokenizationError(
            f"document {doc.id!r}: {e}. Set normalize=nfc if not set, drop that tokenizer, "
            "or set on_tokenization_error=skip") from None


def _process_in_worker(state: tuple[list[Tokenizer], PrepareConfig], doc: Document) -> list[Document] | None:
    return _process(doc, *state)


def _pieces(docs: Iterable[Document], tokenizers: list[Tokenizer], cfg: PrepareConfig
            ) -> Iterator[tuple[Document, list[Document] | None]]:
    if cfg.workers == 0:
        yield from ((d, _process(d, tokenizers, cfg)) for d in docs)
        return
    # Bounded windows (a plain map would read the whole corpus ahead into memory); results come back in order.
    yield from spawn_map(_process_in_worker, docs, cfg.workers, _worker_state, cfg, chunksize=8,
                         window=64 * cfg.workers)


def main(cfg: PrepareConfig) -> dict:
    """Prepare the store at `cfg.output`; returns its documents.json content."""
    from tqdm import tqdm

    tokenizers = [load_tokenizer(p) for p in cfg.tokenizers]
    meta = {
        "prepare": normalised(config_loader.to_dict(cfg)),
        "tokenizers": [{"path": p, "name": t.name, "fingerprint": t.fingerprint} for p, t in zip(cfg.tokenizers, tokenizers)],
    }
    read = split_docs = pieces = skipped = 0
    with DocumentWriter(cfg.output, meta, cfg.overwrite) as writer:
        docs = tqdm(read_documents(cfg.corpus), desc="prepare", unit="doc", disable=None, mininterval=2.0,
                    total=cfg.corpus.max_documents or None)
        for doc, out in _pieces(docs, tokenizers, cfg):
            read += 1
            if out is None:
                skipped += 1
                continue
            if len(out) > 1:
                split_docs, pieces = split_docs + 1, pieces + len(out)
            split = split_of(doc.id, cfg.validation_fraction)
            for piece in out:
                writer.add(piece, split)
    result = writer.meta
    _log_summary(result, read, split_docs, pieces, skipped, cfg)
    return result


def _log_summary(meta: dict, read: int, split_docs: int, pieces: int, skipped: int, cfg: PrepareConfig) -> None:
    names = ", ".join(t["name"] for t in meta["tokenizers"])
    log.info("prepare: %d documents read; %d longer than %d tokens (under %s) split into %d pieces; "
             "%d skipped (tokenization) → %s", read, split_docs, cfg.max_tokens, names, pieces, skipped, cfg.output)
    splits = meta["splits"]
    for s in SPLITS:
        log.info("  %-10s %9d documents %14d bytes  fingerprint %s", s, splits[s]["documents"], splits[s]["bytes"],
                 splits[s]["fingerprint"][:16])
    for d in sorted({d for s in SPLITS for d in splits[s]["domains"]}):
        parts = [f"{s} {splits[s]['domains'].get(d, {}).get('documents', 0)} docs "
                 f"{splits[s]['domains'].get(d, {}).get('bytes', 0)} bytes" for s in SPLITS]
        log.info("  domain %s: %s", d, "; ".join(parts))
