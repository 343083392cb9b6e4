"""The loader's teachers at run time: each teacher's opened cache, tokenizer and the tables its transfer needs.

:func:`open_teachers` opens every teacher of a :class:`~fusion_jax.config.schema.LoaderConfig` and checks each cache
against the document store and the loader's settings (:func:`check_cache`); a :class:`TeacherReader` reads one
document's record (checked against the document) and transfers its rows onto the target positions (``bytes``:
:func:`~fusion_jax.align.transfer.transfer_topk`; ``fusellm``: :meth:`FuseLLMPair.transfer`).
"""

from __future__ import annotations

import numpy as np

from fusion_jax.align.fusellm import FuseLLMPair
from fusion_jax.align.continuation import Continuation, continuation_tables
from fusion_jax.align.transfer import SparseRows, covering, transfer_topk
from fusion_jax.align.vocab import vocab_map
from fusion_jax.config.schema import LoaderConfig, TeacherConfig
from fusion_jax.data.corpus import Document
from fusion_jax.data.teacher_cache import CacheError, TeacherCache, TeacherRecord
from fusion_jax.errors import InputError
from fusion_jax.tokenizers import load_tokenizer


class LoaderError(InputError):
    """A loader that cannot be built or a batch that cannot be made; the message names the teacher and field."""


class TeacherReader:
    """A teacher at run time: its opened cache and the tables its transfer needs. Picklable (the tokenizers and the
    FuseLLM pair tables are rebuilt lazily in each worker)."""

    def __init__(self, spec: TeacherConfig, cache: TeacherCache | None, tokenizer_path: str, target_path: str,
                 table: np.ndarray | None, tokenizer=None):
        self.spec, self.name, self.cache = spec, spec.label, cache  # cache None: an online teacher
        self.tokenizer_path, self.target_path = tokenizer_path, target_path
        self.table = table  # bytes: the vocab map; fusellm soft: the MinED map; fusellm hard: None
        self._pair = None
        self._continuation = None
        self._tokenizer = tokenizer

    @property
    def online(self) -> bool:
        return self.spec.online

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pair"] = None
        state["_continuation"] = None
        state["_tokenizer"] = None
        return state

    def pair(self, target):
        if self._pair is None:
            self._pair = FuseLLMPair(load_tokenizer(self.tokenizer_path), target, mined=self.table)
        return self._pair

    def continuation(self, target) -> Continuation:
        """The tables for rows inside a source token (``spec.continuation``), built once per worker."""
        if self._continuation is None:
            self._continuation = continuation_tables(self.tokenizer, target)
        return self._continuation

    def read(self, d: int, doc: Document, num_bytes: int) -> TeacherRecord:
        """The cache's record of document ``d``, checked to be this document (its id and its ``num_bytes``)."""
        try:
            rec = self.cache[d]
        except (CacheError, RuntimeError) as e:  # RuntimeError: ArrayRecord's chunk hash caught a corrupted read
            raise LoaderError(
                f"teacher {self.name}: cannot read document {d} from the cache {self.cache.path}: {e}; check it with "
                "verify=full and capture the damaged shard again"
            ) from e
        if rec.doc_id != doc.id:
            raise LoaderError(
                f"teacher {self.name}: cache record {d} is document {rec.doc_id!r} but the document store has "
                f"{doc.id!r} there: the cache ({self.cache.path}) was captured from other documents; capture again "
                "from this store"
            )
        if rec.num_bytes != num_bytes:
            raise LoaderError(
                f"teacher {self.name}: cache record {d} ({doc.id!r}) covers {rec.num_bytes} bytes but the document "
                f"has {num_bytes}: the cache ({self.cache.path}) was captured from other text; capture again"
            )
        return rec

    def transfer(self, rec, tgt_ids: np.ndarray, tgt_byte_end: np.ndarray, k: int, target) -> SparseRows:
        s = self.spec
        if s.align == "bytes":
            return transfer_topk(rec.byte_end, tgt_byte_end, tgt_ids, rec.topk_ids, rec.topk_logprobs,
                                 covering(self.table, rec.topk_ids), fallback=s.fallback, k_out=k,
                                 continuation=self.continuation(target) if s.continuation else None, src_ids=rec.ids,
                                 in_context=s.in_context, src_next_logprob=-rec.token_ce, tail=s.tail)
        return self.pair(target).transfer(rec.ids, tgt_ids, rec.topk_ids[:, :k], rec.topk_logprobs[:, :k],
                                          vocab_align=s.vocab_align, onehot_target=s.onehot_target,
                                          tie_order=s.tie_order, drop_beyond_vocab=True)


def check_cache(spec: TeacherConfig, cache: TeacherCache, src, cfg: LoaderConfig, store) -> None:
    """The cache was captured with this teacher's tokenizer ``src``, from this store, with the loader's settings."""
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


def _open_online(spec: TeacherConfig, src, target, target_path: str, cfg: LoaderConfig) -> TeacherReader:
    if cfg.append_eos and src.eos_id is None:
        raise LoaderError(f"teacher {spec.label}: tokenizer {spec.tokenizer_path} has no EOS token, needed "
                          "with append_eos=true")
    table = vocab_map(src, target, spec.vocab_map, cfg.cache_dir)
    return TeacherReader(spec, None, spec.tokenizer_path, target_path, table, src)


def _open_cached(spec: TeacherConfig, src, target, target_path: str, cfg: LoaderConfig, store) -> TeacherReader:
    cache = TeacherCache(spec.cache, verify=cfg.verify)
    check_cache(spec, cache, src, cfg, store)
    if spec.align == "bytes":
        table = vocab_map(src, target, spec.vocab_map, cfg.cache_dir)
    elif spec.vocab_align == "soft":
        table = vocab_map(src, target, "mined", cfg.cache_dir)
    else:
        table = None
    return TeacherReader(spec, cache, spec.tokenizer_path, target_path, table)


def open_teachers(cfg: LoaderConfig, store, target, target_path: str) -> list[TeacherReader]:
    """Every teacher of ``cfg``, in config order: tokenizer loaded, cache opened and checked, tables built."""
    teachers = []
    for spec in cfg.teachers:
        src = load_tokenizer(spec.tokenizer_path)
        if spec.online:
            teachers.append(_open_online(spec, src, target, target_path, cfg))
        else:
            teachers.append(_open_cached(spec, src, target, target_path, cfg, store))
    return teachers
