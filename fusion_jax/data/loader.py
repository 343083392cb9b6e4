"""The fusion data loader: packed target blocks with every teacher's top-k transferred onto the target positions.

Pipeline:

1. Target lengths: every document of the store is tokenized once with the target tokenizer (EOS appended when
   ``append_eos``); the counts are cached as ``<cache_dir>/doc_lengths/<key>.npy``, keyed by the store split's and
   the target tokenizer's fingerprints (:func:`~fusion_jax.data.lengths.target_lengths`).
2. Plan: :class:`~fusion_jax.data.packing.PackingPlan` over those lengths: global block ``g`` is a pure function of
   (lengths, seq_len, seed, g). Global batch ``s`` is blocks ``[s·B, (s+1)·B)``.
3. Blocks: :class:`~fusion_jax.data.blocks.BlockBuilder` (picklable, runs in grain workers) turns block ``g`` into
   fixed-shape numpy arrays, with the teachers opened and checked by :mod:`fusion_jax.data.teachers`.
   Per segment it encodes the document with the target tokenizer, reads each teacher's record of that document
   from its cache, transfers the teacher's rows onto the target positions of the *whole document* (``bytes``:
   :func:`~fusion_jax.align.transfer.transfer_topk`; ``fusellm``: :meth:`FuseLLMPair.transfer`) and slices the
   segment's rows. Recently used documents are kept in a small LRU, since documents straddle blocks.
4. Batches: each process builds only its rows of every global batch (the rows its devices hold under the ``batch``
   logical axis; ``[p·B/P, (p+1)·B/P)`` on a usual mesh) with grain (``worker_count`` processes, or in-process),
   then :func:`jax.make_array_from_process_local_data` assembles global ``jax.Array``s.

A batch (leading dimension B = global batch size; numpy per host, ``jax.Array`` globally)::

    tokens       int32[B, T]     target tokens (0 on padding)
    segment_ids  int32[B, T]     1, 2, … per document piece, 0 = padding (one segment per block when
                                 mask_documents=False, the official mode)
    positions    int32[B, T]     position in the segment (0..T−1 in the official mode)
    loss_mask    bool[B, T]      the position has a next-token label in the same segment
    doc_index    int32[B, T]     document of the position in the store split, −1 on padding
    token_bytes  int32[B, T]     UTF-8 bytes of each target token (0 for EOS and padding), for bits per byte
    teachers     list, one dict per teacher, in config order:
        ids       int32[B, T, k]     target ids, best first (pads: 0)
        logprobs  float32[B, T, k]   log-weights (−inf pads)
        kind      int8[B, T]         ROW_TEACHER | ROW_ONEHOT | ROW_EMPTY (padding: ROW_EMPTY)
        seq_ce    float32[B]         official block score: token-weighted mean over the block's non-pad positions of
                                     their document's ``doc_ce`` (the teacher's CE on its own tokens)
        seq_bpb   float32[B]         the teacher's CE summed over its tokens whose span lies inside the block's text
                                     (and that it predicted: not its first token of a document), over ln 2 × those
                                     tokens' bytes; NaN when the block holds no such byte
        chunk_start    int32[B, T]   byte chunks for likelihood matching (``align.chunks``): at the position
                                     predicting a chunk's last target token, the position predicting its first;
                                     −1 elsewhere (only chunks whose tokens are all predicted inside one piece)
        chunk_logprob  float32[B, T] the teacher's log-probability of its own tokens over that chunk; 0 elsewhere
      an *online* teacher (``TeacherConfig.mode == 'online'``: no cache, its forward runs inside the train step,
      ``fusion_jax/fusion/online.py``) ships its inputs and the alignment table instead of rows (Ts = its ``seq_len``):
        src_tokens       int32[B, Ts]    the source tokens of the block's document pieces, one segment per piece
        src_segment_ids  int32[B, Ts]    1, 2, … (the piece's target segment id), 0 = padding
        src_positions    int32[B, Ts]    position in the segment
        src_token_bytes  int32[B, Ts]    UTF-8 bytes of each source token (0 for EOS and padding)
        gather           int32[B, T]     for target position t the source-block position whose row predicts from
                                         the same text (same byte end and rank, ``matching_positions`` on the
                                         whole document), −1 if none (→ fallback)
        next_ids         int32[B, T]     the target's next token in the same document (−1: none), for the
                                         ``onehot_next`` fallback — as the cached transfer uses it
        src_overflow     int32[B]        source tokens of the block that did not fit in Ts (their target rows
                                         fall back); raise the teacher's seq_len when this is not 0

    Per piece (document d, target tokens [a, e) covering bytes [lo, hi)), the online source block holds the source
    tokens of d (+EOS as the caches have it, in the document's last piece) whose byte span lies inside [lo, hi]; a
    source token crossing ``lo`` is dropped (its bytes belong to the previous piece too), so the source's context in
    a piece that starts mid-document can begin a few bytes after the target's. Pieces that start at the document's
    start see exactly the context the cache sees. The source block always has one segment per piece, also with
    ``mask_documents=False``.

Resuming: ``loader.state()`` is a small dict of plain values (the next step plus what the batches depend on);
``FusionLoader(..., state=s)`` or ``loader.restore(s)`` continues with exactly the batches the saved run would have
seen. With ``worker_count > 0`` grain starts worker processes that re-import the main module (guard scripts with
``if __name__ == "__main__"``); absl flags are marked parsed if nobody parsed them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fusion_jax.config.schema import DEFAULT_RULES, LoaderConfig, TeacherConfig
from fusion_jax.data.blocks import BlockBuilder
from fusion_jax.data.documents import DocumentStore
from fusion_jax.data.lengths import target_lengths
from fusion_jax.data.packing import PackingPlan
from fusion_jax.data.teachers import LoaderError, TeacherReader, open_teachers
from fusion_jax.mesh import logical_to_spec
from fusion_jax.tokenizers import load_tokenizer

__all__ = ["FusionLoader", "LoaderConfig", "LoaderError", "TeacherConfig", "target_lengths"]

log = logging.getLogger(__name__)

_STEPS_AHEAD = 1 << 40  # the grain range is "infinite"


class _LocalBatch:
    """grain map: global step → this host's rows ``[lo, hi)`` of the global batch (a pure function of the step)."""

    def __init__(self, builder: BlockBuilder, global_batch_size: int, rows: tuple[int, int]):
        self.builder, self.B, self.rows = builder, int(global_batch_size), rows

    def __call__(self, step: int) -> dict[str, Any]:
        lo, hi = self.rows
        batch = self.builder.batch([int(step) * self.B + r for r in range(lo, hi)])
        batch["teachers"] = tuple(batch["teachers"])  # a fixed structure through grain; a list again on output
        return batch


# ------------------------------------------------------------------------------------------------ sharding


def _rows_for(mesh, rules, B: int, process_index: int, process_count: int) -> tuple[int, int]:
    """This process's rows of the global batch: those its devices hold under the batch sharding, else p·B/P."""
    if mesh is None:
        if B % process_count:
            raise LoaderError(f"global_batch_size {B} is not divisible by the {process_count} processes")
        per = B // process_count
        return process_index * per, (process_index + 1) * per
    idx = _batch_sharding(mesh, rules, B, 1).addressable_devices_indices_map((B,))
    spans = sorted({sl[0].indices(B)[:2] for sl in idx.values()})
    lo, hi = spans[0][0], max(e for _, e in spans)
    covered = sum(e - s for s, e in spans)
    if covered != hi - lo:
        raise LoaderError(f"this process's devices hold rows {spans} of the batch, not one contiguous range: "
                          "order the mesh devices by process")
    return lo, hi


def _batch_sharding(mesh, rules, B: int, ndim: int) -> NamedSharding:
    spec = logical_to_spec(("batch",), rules, mesh, (B,))
    return NamedSharding(mesh, PartitionSpec(spec[0], *([None] * (ndim - 1))))


# ------------------------------------------------------------------------------------------------ the loader


class FusionLoader:
    """Per-host batches of packed target blocks with every teacher's transferred rows (module docstring).

    documents: a :class:`~fusion_jax.data.documents.DocumentStore` or its directory (with ``split``);
    target_tokenizer: path of the target tokenizer (the workers load it from there);
    mesh / rules: where global batches live (``batch`` logical axis); without a mesh, iteration yields this
    process's numpy rows. process_index / process_count default to JAX's (pass them to simulate hosts without a
    mesh). state: a :meth:`state` dict to resume from.
    """

    def __init__(self, cfg: LoaderConfig, documents, target_tokenizer: str | Path, *, split: str = "train",
                 mesh=None, rules: dict[str, tuple[str, ...]] | None = None, process_index: int | None = None,
                 process_count: int | None = None, state: dict | None = None, progress: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.store = DocumentStore(documents, split) if isinstance(documents, (str, Path)) else documents
        self.target_path = str(target_tokenizer)
        self.target = target = load_tokenizer(target_tokenizer)
        if cfg.append_eos and target.eos_id is None:
            raise LoaderError(f"target tokenizer {target_tokenizer}: no EOS token, needed with append_eos=true")
        teachers = open_teachers(cfg, self.store, target, self.target_path)
        self.plan = self._plan(teachers, progress)
        self.builder = BlockBuilder(self.plan, self.store, self.target_path, teachers, cfg.k, cfg.append_eos,
                                    cfg.mask_documents, cfg.doc_cache, target=target)
        self.teachers = teachers
        self._place(mesh, rules, process_index, process_count)
        self._map = _LocalBatch(self.builder, cfg.global_batch_size, self.rows)
        self._step = 0
        self._iter = None
        if state is not None:
            self.restore(state)

    def _plan(self, teachers: list[TeacherReader], progress: bool) -> PackingPlan:
        """The packing plan over the documents every teacher's cache covers (sets :attr:`num_docs`)."""
        cfg = self.cfg
        raw = target_lengths(self.store, self.target, self.target_path, cfg.cache_dir, workers=cfg.worker_count,
                             progress=progress)
        # Caches captured with max_documents cover a prefix of the store: pack the documents every teacher has.
        self.num_docs = min([len(self.store), *(len(t.cache) for t in teachers if not t.online)])
        if self.num_docs < len(self.store):
            short = [t.name for t in teachers if not t.online and len(t.cache) == self.num_docs]
            log.warning("packing the first %d of %d documents: the caches of %s cover only those", self.num_docs,
                        len(self.store), ", ".join(short))
        raw = raw[:self.num_docs]
        return PackingPlan(raw + int(cfg.append_eos), cfg.seq_len, cfg.seed)

    def _place(self, mesh, rules, process_index: int | None, process_count: int | None) -> None:
        """Where batches live: the mesh and rules, this process among the processes, and its rows of a batch."""
        self.mesh, self.rules = mesh, rules
        if mesh is not None and self.rules is None:
            self.rules = dict(DEFAULT_RULES)
        if mesh is not None and ((process_index is not None and process_index != jax.process_index())
                                 or (process_count is not None and process_count != jax.process_count())):
            raise LoaderError("process_index/process_count can only be overridden without a mesh (simulated hosts "
                              "yield numpy rows); with a mesh they are JAX's")
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise LoaderError(f"process_index {self.process_index} not in [0, {self.process_count})")
        self.rows = _rows_for(mesh, self.rules, self.cfg.global_batch_size, self.process_index, self.process_count)

    # -------------------------------------------------------------------------------------------- state

    def _identity(self) -> dict[str, Any]:
        c = self.cfg
        return {"plan": self.plan.fingerprint, "global_batch_size": c.global_batch_size, "k": c.k,
                "mask_documents": c.mask_documents, "teachers": [t.label for t in c.teachers]}

    def state(self) -> dict[str, Any]:
        """The position to resume from: ``{"step": next step, ...what the batches depend on}`` (plain values)."""
        return {"step": self._step, **self._identity()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue at ``state["step"]``; a state saved with other data settings is refused, naming the field."""
        mine = self._identity()
        for key, want in mine.items():
            have = state.get(key)
            if isinstance(have, tuple):
                have = list(have)
            if have != want:
                hint = " (documents, target tokenizer, seq_len, seed or append_eos changed)" if key == "plan" else ""
                raise LoaderError(f"loader state: {key}={have!r} was saved but this loader has {key}={want!r}{hint}; "
                                  "resume with the data settings of the saved run")
        step = int(state["step"])
        if step < 0:
            raise LoaderError(f"loader state: step must be non-negative, got {step}")
        self.close()
        self._step = step

    @property
    def step(self) -> int:
        return self._step

    # -------------------------------------------------------------------------------------------- batches

    def local_batch(self, step: int) -> dict[str, Any]:
        """This process's rows of global batch ``step`` as numpy (built here, no grain)."""
        out = self._map(step)
        out["teachers"] = list(out["teachers"])
        return out

    def global_batch(self, step: int):
        """Global batch ``step`` as ``jax.Array``s on the mesh (built here, no grain)."""
        return self.to_global(self.local_batch(step))

    def sharding(self, ndim: int):
        """The NamedSharding of a batch leaf with ``ndim`` dimensions (batch axis first)."""
        if self.mesh is None:
            raise LoaderError("no mesh: give FusionLoader(mesh=...) to make global arrays")
        return _batch_sharding(self.mesh, self.rules, self.cfg.global_batch_size, ndim)

    def to_global(self, local: dict[str, Any]):
        B = self.cfg.global_batch_size

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(self.sharding(x.ndim), x, (B, *x.shape[1:]))

        return jax.tree.map(put, local)

    def vocab_maps(self) -> dict[str, np.ndarray]:
        """The online teachers' vocab maps (name → int32[V_src], −1 = unmapped), in config order: constants the
        train step receives once, not per batch."""
        return {t.name: t.table for t in self.teachers if t.online}

    def element_spec(self):
        """The global batch as a pytree of ``jax.ShapeDtypeStruct`` (with shardings when there is a mesh)."""
        B, T, k = self.cfg.global_batch_size, self.cfg.seq_len, self.cfg.k

        def s(shape, dtype):
            sh = self.sharding(len(shape)) if self.mesh is not None else None
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

        def teacher(spec: TeacherConfig) -> dict:
            if spec.online:
                Ts = spec.source_len(T)
                return {"src_tokens": s((B, Ts), np.int32), "src_segment_ids": s((B, Ts), np.int32),
                        "src_positions": s((B, Ts), np.int32), "src_token_bytes": s((B, Ts), np.int32),
                        "gather": s((B, T), np.int32), "next_ids": s((B, T), np.int32),
                        "src_overflow": s((B,), np.int32)}
            return {"ids": s((B, T, k), np.int32), "logprobs": s((B, T, k), np.float32), "kind": s((B, T), np.int8),
                    "seq_ce": s((B,), np.float32), "seq_bpb": s((B,), np.float32),
                    "chunk_start": s((B, T), np.int32), "chunk_logprob": s((B, T), np.float32)}

        return {"tokens": s((B, T), np.int32), "segment_ids": s((B, T), np.int32), "positions": s((B, T), np.int32),
                "loss_mask": s((B, T), np.bool_), "doc_index": s((B, T), np.int32),
                "token_bytes": s((B, T), np.int32), "teachers": [teacher(t) for t in self.cfg.teachers]}

    def _pipeline(self):
        import grain

        c = self.cfg
        ds = grain.MapDataset.range(self._step, self._step + _STEPS_AHEAD).map(self._map)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if c.prefetch else 0,
                                                  prefetch_buffer_size=c.prefetch))
        if c.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain workers read absl flags: unparsed, they raise UnparsedFlagAccessError
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.worker_count,
                                                             per_worker_buffer_size=max(1, c.prefetch)))
        return iter(it)

    def __iter__(self):
        return self

    def __next__(self):
        """The next batch: global ``jax.Array``s with a mesh, else this process's numpy rows."""
        if self._iter is None:
            self._iter = self._pipeline()
        local = next(self._iter)
        local["teachers"] = list(local["teachers"])
        self._step += 1
        return local if self.mesh is None else self.to_global(local)

    def close(self) -> None:
        """Stop the grain pipeline (worker processes); iteration restarts from :attr:`step`."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
