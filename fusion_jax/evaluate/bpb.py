"""python -m fusion_jax.evaluate — bits per byte of a model over documents, overall and per domain.

Bits per byte is the metric comparable across tokenizers: the total next-token cross-entropy (nats) of a model over a
text, divided by ln 2 and by the text's UTF-8 bytes.

What is scored (keep it the same for every model compared):
  * each document is tokenized alone (no BOS/EOS from the tokenizer); with ``append_eos`` (default) the tokenizer's
    EOS is appended, so the model is also scored on predicting where the document ends;
  * with ``bos`` (only for tokenizers that have one) the BOS token is prepended, so the first token is predicted
    too. Without it — the default, as in the rest of this pipeline, which never inserts a BOS — the first token has
    no context and is not scored; its bytes stay in the denominator (reported as ``unscored_bytes``), so a
    tokenizer with long first tokens gets a slight advantage on very short documents;
  * every other token is scored exactly once, conditioned on the tokens before it in its document (documents are
    packed into rows with segment masks: nothing attends across documents, positions restart per document).

Documents longer than ``seq_len`` tokens are scored in windows of at most ``seq_len`` tokens. The first window
starts at the document's start; each later window starts ``context`` tokens before the first token it scores, so
every token after the first window is predicted from at least ``context`` tokens of the text before it (the
"sliding window with stride" of the usual perplexity recipes; ``context`` = seq_len // 2 by default, 1 for disjoint
windows that only share one token, seq_len − 1 for a full sliding window, one window per scored token). Positions
restart at 0 in each window.

Log-sum-exp over the vocabulary runs in chunks of ``logits_chunk`` positions (no float32 [B, T, V] buffer); the
batches are sharded over the mesh; in a multi-host run each process scores the documents ``i ≡ process_index (mod
process_count)`` and the sums are combined across processes, so every process returns the same report.

  python -m fusion_jax.evaluate --set checkpoint=DIR --set documents=STORE --set split=validation
  python -m fusion_jax.evaluate --set checkpoint=DIR --set corpus.paths=[val.jsonl] --set corpus.domain_field=meta.set

With ``tasks.names``, the model also runs benchmark tasks through lm-evaluation-harness (fusion_jax.evaluate.harness):
from lm-eval's registry (their data from the hub, when online) or from task YAMLs over local files in
``tasks.include`` directories; lm-eval's results go into the report under "tasks" and its table is printed.

  python -m fusion_jax.evaluate --set checkpoint=DIR --set 'tasks.names=[hellaswag,arc_easy]' --set tasks.limit=200
  python -m fusion_jax.evaluate --set checkpoint=DIR --set 'tasks.names=[my_task]' --set 'tasks.include=[my_tasks/]'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Sequence

import jax
import numpy as np
from tqdm import tqdm

from fusion_jax import mesh as mesh_lib
from fusion_jax.config import loader as config_loader
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import EvaluateConfig
from fusion_jax.data.corpus import Document, read_documents
from fusion_jax.data.documents import DocumentStore
from fusion_jax.data.scoring import Batch, RowStep, compiled_ce_step, pack_batches, row_lengths, score_rows
from fusion_jax.errors import CheckpointError, ConfigError, InputError
from fusion_jax.files import AnyPath, as_path, atomic_write_text
from fusion_jax.models.head import ce_step
from fusion_jax.evaluate.model import bos_token_id, load_model
from fusion_jax.tokenizers import Tokenizer, check_vocab_size

__all__ = ["EvaluateConfig", "bos_token_id", "ce_step", "evaluate_bpb", "main", "windows"]

log = logging.getLogger("fusion_jax.evaluate.bpb")
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------ host side


def windows(n: int, seq_len: int, context: int) -> list[tuple[int, int, int]]:
    """The windows that score a document of n tokens: (start, end, first) with tokens [start, end) fed to the model
    and positions first .. end-start-2 of the window scored (each predicting the window's next token). Every token
    1 .. n-1 is scored exactly once; a window after the first begins `context` tokens before its first scored
    token."""
    if not 1 <= context < seq_len:
        raise ValueError(f"context must be in [1, seq_len), got {context} (seq_len {seq_len})")
    out, target, start = [], 1, 0
    while target < n:
        end = min(start + seq_len, n)
        out.append((start, end, target - start - 1))
        target, start = end, end - context
    return out


@dataclasses.dataclass
class _Piece:
    tokens: np.ndarray  # int32[m], m <= seq_len
    first: int  # first scored position
    domain: str


def _batches(pieces: list[_Piece], seq_len: int, rows_per_batch: int) -> list[Batch]:
    """Pieces → batches of rows sized to them (``scoring.pack_batches``), each row a list of _Piece."""
    return pack_batches([len(p.tokens) for p in pieces], rows_per_batch, row_lengths(seq_len), pieces)


def _row_arrays(row: list[_Piece] | None, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A row of pieces (None: padding) → (tokens, segment ids, score) [length]."""
    tokens = np.zeros(length, np.int32)
    segs = np.zeros(length, np.int32)
    score = np.zeros(length, bool)
    off = 0
    for s, p in enumerate(row or (), start=1):
        m = len(p.tokens)
        tokens[off:off + m] = p.tokens
        segs[off:off + m] = s
        score[off + p.first:off + m - 1] = True
        off += m
    return tokens, segs, score


def _read(documents, indices: list[int]) -> list[Document]:
    if hasattr(documents, "__getitems__"):
        return list(documents.__getitems__(indices))
    return [documents[i] for i in indices]


_FIELDS = ("ce", "tokens", "bytes", "documents", "unscored_bytes")


def _summary(s: dict) -> dict:
    out = {"bits_per_byte": s["ce"] / LN2 / s["bytes"] if s["bytes"] else math.nan,
           "ce_per_token": s["ce"] / s["tokens"] if s["tokens"] else math.nan,
           "tokens": int(s["tokens"]), "bytes": int(s["bytes"]), "documents": int(s["documents"]),
           "unscored_bytes": int(s["unscored_bytes"]), "ce_nats": s["ce"]}
    return out


def _check_args(model_cfg: ModelConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int, chunk: int,
                context: int | None, append_eos: bool, bos_id: int | None) -> int:
    """The errors of evaluate_bpb's arguments; returns the context (None or < 0: seq_len // 2)."""
    if batch_size <= 0 or seq_len < 2 or chunk <= 0:
        raise ValueError(f"batch_size and chunk must be positive and seq_len >= 2, got {batch_size}, {chunk}, "
                         f"{seq_len}")
    context = seq_len // 2 if context is None or context < 0 else context
    if not 1 <= context < seq_len:
        raise ValueError(f"context must be in [1, seq_len), got {context} (seq_len {seq_len})")
    if append_eos and tokenizer.eos_id is None:
        raise ConfigError(f"tokenizer {tokenizer.name!r} has no EOS token; set append_eos=false or give a tokenizer "
                         "with one")
    check_vocab_size(tokenizer, model_cfg.vocab_size, "the model")
    if bos_id is not None and not 0 <= bos_id < model_cfg.vocab_size:
        raise CheckpointError(f"bos_id {bos_id} is outside the model's vocabulary [0, {model_cfg.vocab_size})")
    if batch_size % jax.process_count():
        raise ConfigError(f"batch_size {batch_size} must be a multiple of the process count {jax.process_count()}")
    return context


@dataclasses.dataclass(frozen=True)
class _Windowing:
    """How a document becomes scored pieces (see the module docstring)."""

    tokenizer: Tokenizer
    append_eos: bool
    bos_id: int | None
    seq_len: int
    context: int

    def pieces(self, doc: Document, stats: dict[str, dict[str, float]]) -> list[_Piece]:
        """The document's windows (none for an empty text); counts it (documents, bytes, tokens, unscored bytes)
        into stats[its domain]."""
        data = doc.text.encode("utf-8")
        if not data:
            return []
        enc = self.tokenizer.encode(doc.text, eos=self.append_eos)
        ids = enc.ids.astype(np.int32)
        if self.bos_id is not None:
            ids = np.concatenate([np.asarray([self.bos_id], np.int32), ids])
        s = stats.setdefault(doc.domain, dict.fromkeys(_FIELDS, 0))
        s["documents"] += 1
        s["bytes"] += len(data)
        s["tokens"] += max(len(ids) - 1, 0)
        if self.bos_id is None and len(enc.byte_end):
            s["unscored_bytes"] += int(enc.byte_end[0])
        return [_Piece(ids[start:end], first, doc.domain)
                for start, end, first in windows(len(ids), self.seq_len, self.context)]


def _add_ce(stats: dict[str, dict[str, float]], batch: list[list[_Piece]], ce: np.ndarray) -> None:
    """Add a scored batch's CE (float32[rows, seq_len], 0 where not scored) to its pieces' domains."""
    for j, row in enumerate(batch):
        off = 0
        for p in row:
            m = len(p.tokens)
            stats[p.domain]["ce"] += float(ce[j, off:off + m].sum(dtype=np.float64))
            off += m


def _merged_report(stats: dict[str, dict[str, float]], n_docs: int) -> dict:
    """Every process's stats summed (the same report on every process), overall and per domain."""
    merged: dict[str, dict[str, float]] = {}
    for part in mesh_lib.allgather_json(stats):
        for domain, s in part.items():
            m = merged.setdefault(domain, dict.fromkeys(_FIELDS, 0))
            for k in _FIELDS:
                m[k] += s[k]
    total = {k: sum(m[k] for m in merged.values()) for k in _FIELDS}
    if not total["bytes"]:
        raise InputError(f"nothing to evaluate: {n_docs} documents with no text"
                         + (" (max_documents=0 means all)" if not n_docs else ""))
    return {**_summary(total), "domains": {d: _summary(merged[d]) for d in sorted(merged)}}


def evaluate_bpb(
    model_cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    documents: DocumentStore | Sequence[Document],
    *,
    mesh,
    rules,
    batch_size: int,
    seq_len: int,
    append_eos: bool = True,
    max_documents: int = 0,
    chunk: int = 512,
    context: int | None = None,
    bos_id: int | None = None,
    progress: bool = False,
) -> dict:
    """Bits per byte of the model (`params` on `mesh`, e.g. the training state's) over `documents`.

    Returns {"bits_per_byte", "ce_per_token" (nats), "tokens" (scored predictions, EOS included), "bytes" (UTF-8
    bytes of the texts), "documents", "unscored_bytes" (bytes of first tokens that had no context), "ce_nats",
    "domains": {domain: the same fields}}, identical on every process. `context`: see the module docstring (None =
    seq_len // 2); `bos_id`: prepend this token to every document (None: no BOS). Empty texts are skipped.
    """
    context = _check_args(model_cfg, tokenizer, batch_size, seq_len, chunk, context, append_eos, bos_id)
    if not isinstance(documents, (DocumentStore, Sequence)):
        documents = list(documents)
    n_docs = len(documents) if not max_documents else min(max_documents, len(documents))
    pid, nproc = jax.process_index(), jax.process_count()
    local = batch_size // nproc
    rules_key = tuple(sorted((k, tuple(v)) for k, v in rules.items()))
    step, sharding = compiled_ce_step(model_cfg, chunk, rules_key, mesh, batch_size, seq_len)
    run = RowStep(step, params, mesh, sharding, sharding.spec, local, _row_arrays)
    windowing = _Windowing(tokenizer, append_eos, bos_id, seq_len, context)
    stats: dict[str, dict[str, float]] = {}
    mine = list(range(pid, n_docs, nproc))
    group = max(64 * local, 256)  # documents tokenized per round (bounds host memory)
    bar = None
    if progress and pid == 0:
        bar = tqdm(total=n_docs, unit="doc", dynamic_ncols=True, desc=f"evaluate {tokenizer.name}")
    for r in range(mesh_lib.max_over_processes(-(-len(mine) // group))):
        pieces = [p for doc in _read(documents, mine[r * group:(r + 1) * group]) for p in windowing.pieces(doc, stats)]
        score_rows(run, _batches(pieces, seq_len, local), functools.partial(_add_ce, stats))
        if bar is not None:
            bar.update(min(group * nproc, n_docs - r * group * nproc))
    if bar is not None:
        bar.close()
    return _merged_report(stats, n_docs)


# ------------------------------------------------------------------------------------------------ CLI


def format_table(report: dict) -> str:
    """Overall and per-domain documents, tokens (scored), bytes, bits/byte and tokens/byte of an evaluate_bpb report."""
    head = f"{'domain':<24} {'documents':>10} {'tokens':>14} {'bytes':>15} {'bits/byte':>10} {'tokens/byte':>12}"

    def line(name: str, r: dict) -> str:
        tpb = r["tokens"] / r["bytes"] if r["bytes"] else math.nan
        return (f"{name[:24]:<24} {r['documents']:>10,} {r['tokens']:>14,} {r['bytes']:>15,} "
                f"{r['bits_per_byte']:>10.4f} {tpb:>12.4f}")

    return "\n".join([head, line("all", report), *(line("  " + d, r) for d, r in report["domains"].items())])


def check_finite_report(report: dict, model: str, compute_dtype: str) -> None:
    """A NaN or infinite cross-entropy is an error, not a figure: the model's logits overflowed (its parameters load
    finite: `checkpoint.load` checks them)."""
    if math.isfinite(report["ce_nats"]):
        return
    bad = [d for d, r in report["domains"].items() if not math.isfinite(r["ce_nats"])]
    fix = (f"the activations may overflow in {compute_dtype}: evaluate with compute_dtype=float32 (and "
           "param_dtype=float32); if that fails too, the weights are unusable" if compute_dtype != "float32" else
           "its weights make the logits overflow even in float32: the model is unusable (it diverged in training, or "
           "its weights were damaged)")
    raise CheckpointError(
        f"{model}: its cross-entropy is {report['ce_nats']} (bits per byte {report['bits_per_byte']}) on domain(s) "
        f"{', '.join(bad)}: its logits are NaN or infinite, so there is no score to report; {fix}")


def _write_json(path: AnyPath, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _documents(cfg: EvaluateConfig) -> tuple[Sequence[Document] | DocumentStore, dict]:
    """The documents to score and what they are, for the report."""
    if cfg.corpus is not None:
        documents: Sequence[Document] | DocumentStore = list(read_documents(cfg.corpus))
        source = {"corpus": config_loader.to_dict(cfg.corpus)}
    else:
        documents = DocumentStore(cfg.documents, cfg.split)
        source = {"documents": cfg.documents, "split": cfg.split, "fingerprint": documents.fingerprint}
    if not len(documents):
        raise InputError("no documents to evaluate: " + (f"the corpus {list(cfg.corpus.paths)} is empty"
                         if cfg.corpus is not None else f"split {cfg.split!r} of {cfg.documents} is empty"))
    return documents, source


def main(cfg: EvaluateConfig) -> dict:
    cfg.validate()
    mesh_lib.initialize_distributed(cfg.mesh)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    scored = _documents(cfg) if cfg.documents or cfg.corpus is not None else None
    model = load_model(cfg.checkpoint, cfg.tokenizer, mesh, cfg.mesh.rules, param_dtype=cfg.param_dtype,
                       compute_dtype=cfg.compute_dtype, bos=cfg.bos,
                       allow_tokenizer_mismatch=cfg.allow_tokenizer_mismatch)
    tok = model.tokenizer
    report: dict = {"checkpoint": cfg.checkpoint, "tokenizer": tok.name, "tokenizer_fingerprint": tok.fingerprint,
                    "bos": cfg.bos, "compute_dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype}
    if scored is not None:
        documents, source = scored
        context = cfg.seq_len // 2 if cfg.context == -1 else cfg.context
        t0 = time.perf_counter()
        result = evaluate_bpb(model.cfg, model.params, tok, documents, mesh=mesh, rules=cfg.mesh.rules,
                              batch_size=cfg.batch_size, seq_len=cfg.seq_len, append_eos=cfg.append_eos,
                              max_documents=cfg.max_documents if cfg.corpus is None else 0, chunk=cfg.logits_chunk,
                              context=context, bos_id=model.bos_id, progress=True)
        seconds = time.perf_counter() - t0
        check_finite_report(result, cfg.checkpoint, cfg.compute_dtype)
        report.update(result, source=source, append_eos=cfg.append_eos, seq_len=cfg.seq_len, context=context,
                      seconds=seconds)
        if jax.process_index() == 0:
            what = f"{cfg.documents} ({cfg.split})" if cfg.corpus is None else ", ".join(cfg.corpus.paths)
            on = lambda flag: "on" if flag else "off"
            print(f"bits/byte of {cfg.checkpoint} (tokenizer {tok.name}) on {what}: EOS {on(cfg.append_eos)}, "
                  f"BOS {on(cfg.bos)}, seq_len {cfg.seq_len}, context {context}, {cfg.compute_dtype}; {seconds:.1f} s")
            print(format_table(result))
    if cfg.tasks.names:
        from fusion_jax.evaluate import harness  # lm-eval loads only when tasks are asked for

        t0 = time.perf_counter()
        report["tasks"] = harness.run_tasks(model, cfg.tasks)
        if jax.process_index() == 0:
            print(f"lm-eval tasks of {cfg.checkpoint}: {time.perf_counter() - t0:.1f} s")
            print(harness.format_tasks_table(report["tasks"]))
    if cfg.output and jax.process_index() == 0:
        _write_json(as_path(cfg.output), report)
    return report
