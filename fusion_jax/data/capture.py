"""python -m fusion_jax.capture --config FILE — run a source model over prepared documents, store its top-k.

Each process of a (multi-host) run handles the shards ``s ≡ process_index (mod process_count)`` of the cache
(``data/teacher_cache.py``): it tokenizes their documents with the source's tokenizer (EOS appended), packs them into
rows of at most ``seq_len`` tokens sized to them (one segment per document: nothing attends across documents;
``data/scoring.py``), and feeds its rows as its share of each global batch to one jitted, sharded forward that
returns, per position, the top-k log-probabilities (log_softmax over the full vocabulary, in chunks of
``logits_chunk`` positions so no [B, T, V] float32 buffer exists) and the CE of the actual next token. A batch never
mixes shards, so a shard's bytes do not depend on what else ran — a re-run after ``kill -9`` skips finished shards
and redoes the unfinished one with identical bytes. Process 0 writes ``manifest.json`` when every shard is done (the
output directory must be shared by all hosts).

``--estimate`` tokenizes a sample of the documents, times one batch, and prints the disk and time the run needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import CaptureConfig
from fusion_jax.convert import checkpoint
from fusion_jax.data import teacher_cache as tc
from fusion_jax.data.documents import DocumentStore
from fusion_jax.data import scoring
from fusion_jax.data.scoring import Batch, RowStep, score_rows
from fusion_jax.errors import ConfigError, InputError
from fusion_jax.files import AnyPath, DirectoryLock, as_path, read_json
from fusion_jax.models.head import topk_step
from fusion_jax.tokenizers import Tokenizer, check_vocab_size, load_tokenizer

log = logging.getLogger("fusion_jax.data.capture")
CAPTURE_SPEC = "capture.json"


@dataclasses.dataclass
class _Doc:
    index: int
    doc_id: str
    ids: np.ndarray
    byte_end: np.ndarray
    num_bytes: int


def _encode(tok: Tokenizer, store: DocumentStore, index: int, append_eos: bool) -> _Doc:
    doc = store[index]
    enc = tok.encode(doc.text, eos=append_eos)
    n_bytes = len(doc.text.encode("utf-8"))
    return _Doc(index, doc.id, enc.ids.astype(np.int32), enc.byte_end.astype(np.int32), n_bytes)


def _check_fits(docs: list[_Doc], seq_len: int) -> None:
    for d in docs:
        n = len(d.ids)
        if n > seq_len:
            raise InputError(
                f"document {d.doc_id!r} has {n} tokens under this tokenizer (EOS included) but seq_len is {seq_len}: "
                f"prepare the documents with max_tokens ≤ {seq_len - 1} for every tokenizer of the run, or raise "
                "seq_len"
            )
        if n == 0:
            raise InputError(f"document {d.doc_id!r} is empty: nothing to capture (prepare drops empty documents)")


def _batches(docs: list[_Doc], cfg: CaptureConfig, rows_per_batch: int) -> list[Batch]:
    """One shard's documents → batches of rows (``scoring.pack_batches``), each row a list of _Doc: sized to the
    documents with ``fit_rows`` in a one-process capture; else all ``seq_len`` long, so that the shard's bytes do not
    depend on the other processes' shards in the same global batches (the row length changes the float rounding)."""
    _check_fits(docs, cfg.seq_len)
    fit = cfg.fit_rows and jax.process_count() == 1
    lengths = scoring.row_lengths(cfg.seq_len) if fit else (cfg.seq_len,)
    return scoring.pack_batches([len(d.ids) for d in docs], rows_per_batch, lengths, docs)


def _row_arrays(row: list[_Doc] | None, length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros(length, np.int32)
    segs = np.zeros(length, np.int32)
    off = 0
    for s, d in enumerate(row or (), start=1):
        tokens[off:off + len(d.ids)] = d.ids
        segs[off:off + len(d.ids)] = s
        off += len(d.ids)
    return tokens, segs


def _record(d: _Doc, top_lp: np.ndarray, top_ids: np.ndarray, ce: np.ndarray) -> tc.TeacherRecord:
    if not np.isfinite(top_lp[:, 0]).all() or np.isnan(top_lp).any():
        raise FloatingPointError(
            f"document {d.doc_id!r}: the model produced NaN/inf log-probabilities (check the checkpoint and dtype)"
        )
    valid = ce[:-1]
    return tc.TeacherRecord(
        doc_index=d.index, doc_id=d.doc_id, ids=d.ids, byte_end=d.byte_end, topk_ids=top_ids,
        topk_logprobs=top_lp, token_ce=ce, doc_ce=float(valid.mean()) if valid.size else 0.0, num_bytes=d.num_bytes,
    )


def model_identity(path: str) -> dict:
    """What identifies a model for the cache manifest: its directory name, config digest and a content fingerprint
    of its weight files, so a checkpoint changed in place (same shapes, same bytes count) is noticed. The weights are
    hashed once; later starts reuse the hashes, remembered by path, size and mtime (`files.cached_file_sha256`).
    A GGUF file's config is the HF config its metadata gives (the file itself is its one weight file)."""
    p = Path(path)
    k = checkpoint.kind(p)
    if k == "gguf":
        config = json.dumps(checkpoint.source_info(p)[1], sort_keys=True).encode()
    else:
        config = (p / (checkpoint.META if k == "fusion_jax" else "config.json")).read_bytes()
    return {"name": p.name, "config_sha256": hashlib.sha256(config).hexdigest(),
            "weights_sha256": checkpoint.weights_fingerprint(p)}


def _source_changed(out: AnyPath, recorded: dict, spec: dict, source: str) -> tc.CacheError | None:
    """The error for a cache captured from this very source before its weights changed (None otherwise)."""
    old, new = recorded.get("model") if isinstance(recorded, dict) else None, spec["model"]
    if not isinstance(old, dict) or old == new or old.get("name") != new["name"]:
        return None
    if "weights_sha256" not in old:
        what = "captured by a fusion_jax that did not fingerprint the weights"
    else:
        what = ", ".join(f"{k.removesuffix('_sha256')} fingerprint then {str(old.get(k))[:12]}, now {new[k][:12]}"
                         for k in ("config_sha256", "weights_sha256") if old.get(k) != new[k])
    return tc.CacheError(
        f"{out} was captured from a model named {new['name']} whose weights or config differ from {source} now "
        f"({what}): the source changed since the capture, so the cache does not hold its predictions. Delete {out} "
        "to capture again, or write the capture to another directory (output; cache_dir in a training run)")


def capture_spec(cfg: CaptureConfig, store: DocumentStore, tok: Tokenizer, model_cfg: ModelConfig, n_docs: int) -> dict:
    """The manifest fields that identify this capture; a cache is reused only if all of them match."""
    return {
        "model": model_identity(cfg.source), "tokenizer": tok.fingerprint, "tokenizer_name": tok.name,
        "vocab_size": model_cfg.vocab_size, "k": cfg.k, "append_eos": cfg.append_eos,
        "logprob_format": cfg.logprob_format, "compute_dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype,
        "documents": {"fingerprint": store.fingerprint, "split": cfg.split, "num_docs": n_docs},
        "docs_per_shard": cfg.docs_per_shard,
    }


def _check_resume(out: AnyPath, spec: dict, source: str) -> None:
    """A directory with an earlier capture's files continues only if it was the same capture."""
    path = out / CAPTURE_SPEC
    if not path.exists():
        if any(out.glob("shard-*")):
            raise tc.CacheError(f"{out} holds shard files but no {CAPTURE_SPEC}: not a capture of ours; use a new output")
        return
    old = read_json(path, tc.CacheError, f"delete {out} and capture again")
    if not isinstance(old, dict):
        raise tc.CacheError(f"{path}: expected a JSON object; delete {out} and capture again")
    changed = _source_changed(out, old, spec, source)
    if changed is not None:
        raise changed
    diff = [k for k in spec if old.get(k) != spec[k]]
    if diff:
        k = diff[0]
        raise tc.CacheError(
            f"{out} holds a capture with {k}={old.get(k)!r}, this run has {k}={spec[k]!r}; use another output "
            "directory (or delete this one)"
        )


def _shard_batches(cfg: CaptureConfig, store: DocumentStore, tok: Tokenizer, n_docs: int, shard: int,
                   rows_per_batch: int) -> list[Batch]:
    docs = [_encode(tok, store, i, cfg.append_eos) for i in tc.shard_docs(shard, n_docs, cfg.docs_per_shard)]
    return _batches(docs, cfg, rows_per_batch)


def main(cfg: CaptureConfig) -> dict:
    """The capture into ``cfg.output``, which it holds alone: a second capture into the same output fails at once,
    naming the holder (process 0 holds the lock in a multi-host run)."""
    mesh_lib.initialize_distributed(cfg.mesh)
    if cfg.estimate or jax.process_index() != 0:
        return _capture(cfg)
    with DirectoryLock(cfg.output, "capture output"):
        return _capture(cfg)


def _capture(cfg: CaptureConfig) -> dict:
    mesh = mesh_lib.make_mesh(cfg.mesh)
    nproc = jax.process_count()
    if cfg.batch_size % nproc:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the process count {nproc}")
    store = DocumentStore(cfg.documents, cfg.split)
    n_docs = len(store) if not cfg.max_documents else min(cfg.max_documents, len(store))
    tok = load_tokenizer(cfg.tokenizer or cfg.source)
    checkpoint.check_tokenizer(cfg.source, tok, cfg.tokenizer or cfg.source,
                               allow_mismatch=cfg.allow_tokenizer_mismatch)
    if cfg.append_eos and tok.eos_id is None:
        raise ConfigError(f"tokenizer {tok.name!r} has no EOS token; set append_eos=false or give a tokenizer with one")
    model_cfg, params = checkpoint.load(cfg.source, mesh, cfg.mesh.rules, param_dtype=cfg.param_dtype,
                                        compute_dtype=cfg.compute_dtype)
    check_vocab_size(tok, model_cfg.vocab_size, cfg.source)
    run = _row_step(cfg, mesh, model_cfg, params)
    if cfg.estimate:
        return _estimate(cfg, store, tok, model_cfg, n_docs, run)
    spec = capture_spec(cfg, store, tok, model_cfg, n_docs)  # (hashes the weights the first time)
    out = as_path(cfg.output)
    all_shards = list(range(tc.num_shards(n_docs, cfg.docs_per_shard)))
    out.mkdir(parents=True, exist_ok=True)
    if (out / tc.MANIFEST).exists():
        return _already_complete(out, spec, cfg.source, n_docs)
    pending = _pending_shards(cfg, out, spec, all_shards, n_docs)
    rounds = mesh_lib.max_over_processes(len(pending))  # round r: every process captures its r-th pending shard
    progress = _Progress(sum(len(tc.shard_docs(sh, n_docs, cfg.docs_per_shard)) for sh in pending), tok.name)
    written = 0
    for r in range(rounds):
        shard = pending[r] if r < len(pending) else None
        batches = _shard_batches(cfg, store, tok, n_docs, shard, run.local) if shard is not None else []
        records: list[tc.TeacherRecord] = []
        score_rows(run, batches, lambda rows, outputs: records.extend(progress.records(rows, outputs)))
        if shard is not None:
            records.sort(key=lambda x: x.doc_index)  # the shard's document order (the batches ran longest first)
            tc.write_shard(out, shard, (tc.encode_record(x, model_cfg.vocab_size, cfg.logprob_format)
                                        for x in records), [len(x.ids) for x in records])
            written += 1
    progress.bar.close()
    unfinished = [sh for sh in pending if not (out / tc.sidecar_name(sh)).exists()]
    if unfinished:  # pragma: no cover - a bug, not an input error
        raise RuntimeError(f"shards {unfinished} were not completed")
    return _finish(out, spec, all_shards, written, progress)


def _row_step(cfg: CaptureConfig, mesh, model_cfg: ModelConfig, params) -> RowStep:
    """The jitted, sharded top-k step over global batches of ``batch_size`` rows, fed with this process's rows."""
    rules = cfg.mesh.rules
    batch_spec = mesh_lib.logical_to_spec(("batch", "seq"), rules, mesh, (cfg.batch_size, cfg.seq_len))
    batch_devices = int(np.prod([mesh.shape[a] for a in rules.get("batch", ()) if mesh.shape[a] > 1]))
    if cfg.batch_size % batch_devices:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of the batch mesh axes' size {batch_devices} "
                         f"(mesh {dict(mesh.shape)})")
    batch_sharding = jax.NamedSharding(mesh, batch_spec)
    out_sharding = jax.NamedSharding(mesh, mesh_lib.logical_to_spec(("batch", "seq", None), rules, mesh,
                                                                      (cfg.batch_size, cfg.seq_len, cfg.k)))
    ce_sharding = jax.NamedSharding(mesh, batch_sharding.spec)
    with jax.set_mesh(mesh):
        step = jax.jit(
            lambda p, t, s: topk_step(model_cfg, cfg.k, cfg.logits_chunk, rules, p, t, s),
            out_shardings=(out_sharding, out_sharding, ce_sharding),
        )
    return RowStep(step, params, mesh, batch_sharding, (out_sharding.spec, out_sharding.spec, ce_sharding.spec),
                   cfg.batch_size // jax.process_count(), _row_arrays)


def _already_complete(out: AnyPath, spec: dict, source: str, n_docs: int) -> dict:
    """The report of a run whose output holds a finished capture of the same spec (an error for another one)."""
    changed = _source_changed(out, read_json(out / tc.MANIFEST, tc.CacheError, tc.MANIFEST_FIX), spec, source)
    if changed is not None:
        raise changed
    try:
        tc.TeacherCache(out, expect=spec, verify="size")
    except tc.CacheError as e:
        raise tc.CacheError(f"{e} (the output already holds a finished capture)") from None
    log.info("%s: capture already complete (%d documents); nothing to do", out, n_docs)
    return {"output": str(out), "skipped": True}


def _pending_shards(cfg: CaptureConfig, out: AnyPath, spec: dict, all_shards: list[int], n_docs: int) -> list[int]:
    """This process's shards still to capture, after checking (process 0: writing) the capture's spec."""
    pid, nproc = jax.process_index(), jax.process_count()
    if pid == 0:
        _check_resume(out, spec, cfg.source)
        if not (out / CAPTURE_SPEC).exists():
            tc.write_atomic(out / CAPTURE_SPEC, json.dumps(spec, indent=1).encode())
    mesh_lib.sync("capture_spec")
    _check_resume(out, spec, cfg.source)
    mine = [s for s in all_shards if s % nproc == pid]
    done = tc.done_shards(out, mine)
    pending = [s for s in mine if s not in done]
    n_pending_docs = sum(len(tc.shard_docs(sh, n_docs, cfg.docs_per_shard)) for sh in pending)
    log.info("process %d/%d: %d of %d shards to capture (%d done), %s documents", pid, nproc, len(pending), len(mine),
             len(done), f"{n_pending_docs:,}")
    return pending


class _Progress:
    """The capture's progress bar and throughput: tokens captured, and the first batch's time (the compile, left out
    of the tokens/s)."""

    def __init__(self, n_docs: int, name: str):
        self.bar = tqdm(total=n_docs, unit="doc", dynamic_ncols=True, disable=jax.process_index() != 0,
                        desc=f"capture {name}")
        self.t0 = time.perf_counter()
        self.tokens, self.compile_s, self.first_tokens = 0, math.nan, 0

    def records(self, rows: list[list[_Doc]], outputs) -> list[tc.TeacherRecord]:
        """One fetched batch's documents as records (top-k log-probs, ids and token CE per row)."""
        lp, ids, ce = outputs
        if math.isnan(self.compile_s):  # the first call compiles: keep it out of the throughput
            self.compile_s = time.perf_counter() - self.t0
            self.first_tokens = sum(len(d.ids) for row in rows for d in row)
        records = []
        for j, row in enumerate(rows):
            off = 0
            for d in row:
                n = len(d.ids)
                records.append(_record(d, lp[j, off:off + n], ids[j, off:off + n], ce[j, off:off + n]))
                off += n
                self.tokens += n
                self.bar.update(1)
        self.bar.set_postfix_str(f"{self.tokens / (time.perf_counter() - self.t0):,.0f} tok/s", refresh=False)
        return records


def _finish(out: AnyPath, spec: dict, all_shards: list[int], written: int, progress: _Progress) -> dict:
    """The run's report; process 0 writes the manifest once every process has written its shards."""
    seconds = time.perf_counter() - progress.t0
    mesh_lib.sync("capture_shards")
    n_tokens, compile_s, first_tokens = progress.tokens, progress.compile_s, progress.first_tokens
    steady_s = seconds - compile_s
    report = {"output": str(out), "shards_written": written, "tokens": n_tokens, "seconds": seconds,
              "compile_s": compile_s,
              "tokens_per_s": (n_tokens - first_tokens) / steady_s if n_tokens > first_tokens and steady_s > 0
              else math.nan}
    if jax.process_index() == 0:
        sidecars = tc.done_shards(out, all_shards)
        missing = sorted(set(all_shards) - set(sidecars))
        if missing:
            raise tc.CacheError(
                f"{out}: shards {missing[:8]} are not visible to process 0 after every process finished; the output "
                "must be a directory all hosts share"
            )
        manifest = tc.write_manifest(out, spec, list(sidecars.values()))
        tokens = max(manifest["tokens"], 1)
        report.update(bytes=manifest["bytes"], bytes_per_token=manifest["bytes"] / tokens,
                      record_bytes_per_token=manifest["record_bytes"] / tokens)
        log.info("%s: %d documents, %s tokens, %.1f MB on disk (%.1f bytes/token; records %.1f bytes/token); "
                 "%.0f tokens/s", out, manifest["num_docs"], f"{manifest['tokens']:,}", manifest["bytes"] / 1e6,
                 report["bytes_per_token"], report["record_bytes_per_token"], report["tokens_per_s"])
    mesh_lib.sync("capture_manifest")
    return report


def _estimate(cfg: CaptureConfig, store: DocumentStore, tok: Tokenizer, model_cfg: ModelConfig, n_docs: int,
              run: RowStep) -> dict:
    """Tokenize an even sample of documents, time one warm batch, and extrapolate to all documents."""
    sample = np.unique(np.linspace(0, n_docs - 1, min(cfg.estimate_sample, n_docs)).astype(int)) if n_docs else []
    docs = [_encode(tok, store, int(i), cfg.append_eos) for i in sample]
    tokens = sum(len(d.ids) for d in docs) / max(len(docs), 1) * n_docs
    batch = _batches(docs, cfg, run.local)[0]  # the longest rows: the estimate errs on the slow side
    run(batch.rows, batch.length)  # compile
    t0 = time.perf_counter()
    run(batch.rows, batch.length)
    step_s = time.perf_counter() - t0
    fill = sum(len(d.ids) for r in batch.rows for d in r) / (run.local * batch.length)
    tok_s = cfg.batch_size * batch.length * max(fill, 1e-9) / step_s
    per_token = tc.bytes_per_token(cfg.k, model_cfg.vocab_size, cfg.logprob_format)
    disk = tokens * per_token + sum(tc.record_overhead(d.doc_id) for d in docs) / max(len(docs), 1) * n_docs
    report = {"documents": n_docs, "tokens": tokens, "bytes_per_token": per_token, "disk_bytes": disk,
              "tokens_per_s": tok_s, "seconds": tokens / tok_s, "row_fill": fill}
    print(f"estimate for {cfg.source} over {n_docs:,} documents ({cfg.split}): ~{tokens:,.0f} tokens "
          f"(from {len(docs)} documents); disk ~{disk / 1e9:.2f} GB "
          f"({per_token} bytes/token at k={cfg.k}, {cfg.logprob_format}); ~{tok_s:,.0f} tokens/s on "
          f"{jax.device_count()} devices → ~{report['seconds'] / 3600:.2f} h")
    return report
