"""Online teachers: the sources run inside the jitted train step on the same mesh (frozen, bf16, sharded), no cache.

The loader (``data/loader.py``, ``TeacherConfig(mode="online")``) ships, per block and online teacher, the source
tokens of the block's document pieces (``src_tokens``, ``src_segment_ids``, ``src_positions``, ``src_token_bytes``
int32[B, Ts]), the host-computed alignment table ``gather int32[B, T]`` (for each target position the source-block
position whose row predicts from the same text, −1 if none), the target's next token ``next_ids int32[B, T]`` (−1:
none) and ``src_overflow int32[B]`` (source tokens that did not fit in Ts). The step receives, once, each online
teacher's params (frozen: an argument that is neither donated nor differentiated) and its vocab map, and turns the
inputs into the same rows a cached teacher's loader dict holds (:func:`online_rows`):

1. the teacher's forward over ``src_tokens`` (one segment per piece) → per source position its top-``topk``
   log-probs and the CE of its next token (:func:`fusion_jax.models.head.topk_step`, in chunks of positions);
2. the rows at ``gather`` → [B, T, topk]; ids through the vocab map (−1 = unmapped, dropped), probability summed
   per target id, renormalised, the best ``k`` kept (:func:`merge_rows`, the jnp twin of
   :func:`fusion_jax.align.transfer.merge_rows`); ``ROW_TEACHER`` where a row has mass;
3. elsewhere the fallback: ``onehot_next`` (probability 1 on the target's next token, ``ROW_ONEHOT``; ``ROW_EMPTY``
   at a document's last token and on padding) or ``mask`` (``ROW_EMPTY``);
4. ``seq_ce`` = the teacher's mean token CE over its scored source positions of the block (a next token in the same
   piece), ``seq_bpb`` = their CE sum / ln 2 / the predicted tokens' bytes (NaN when none).

These rows join the cached teachers' rows in :meth:`TeacherRows.stack` in config order (:func:`stack_teachers`). With
gradient accumulation the teachers run one micro-batch at a time (``lax.map``), so their activations are bounded
like the student's. Only ``align="bytes"`` is supported: the official ``fusellm`` DTW is host-side string work on
the teacher's top-k per document and needs the cached path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.align.transfer import ROW_EMPTY, ROW_ONEHOT, ROW_TEACHER
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import TeacherConfig
from fusion_jax.errors import CheckpointError, ConfigError
from fusion_jax.fusion.fuse import TeacherRows
from fusion_jax.models.head import topk_step


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
    """What the step needs to know statically about one online teacher: its config, its model's architecture and how
    many candidates it keeps (its params and vocab map are arguments of the step)."""

    teacher: TeacherConfig
    model: ModelConfig
    k: int                   # entries per row after the merge (the loader's k)
    topk: int = 0            # candidates taken from the model per position (0: k); more survive duplicate merges
    logits_chunk: int = 512  # positions per log_softmax/top-k chunk (bounds the float32 [b, chunk, V] buffer)

    @property
    def name(self) -> str:
        return self.teacher.name

    @property
    def fallback(self) -> str:
        return self.teacher.fallback

    def validate(self) -> None:
        self.teacher.validate()
        if self.k <= 0 or self.topk < 0 or self.logits_chunk <= 0:
            raise ConfigError(f"online teacher {self.name}: k and logits_chunk must be positive, topk >= 0")

    @property
    def candidates(self) -> int:
        return max(self.topk or self.k, 1)


ONLINE_INPUTS = ("src_tokens", "src_segment_ids", "src_token_bytes", "gather", "next_ids")  # what the rows use


def is_online(teacher: Mapping[str, Any]) -> bool:
    """A loader teacher dict of an online teacher (inputs, not rows)."""
    return "src_tokens" in teacher


def merge_rows(ids: jax.Array, probs: jax.Array, k_out: int) -> tuple[jax.Array, jax.Array]:
    """ids int[..., k] (−1 = drop), probs float[..., k] → (ids int32[..., k_out], logprobs float32[..., k_out]):
    probability summed per distinct id (into its first occurrence), renormalised, sorted descending (ties: the
    earlier entry first); rows with no mass are all pads (id 0, −inf). O(k²) per row; jnp twin of
    :func:`fusion_jax.align.transfer.merge_rows`."""
    ids = jnp.asarray(ids, jnp.int32)
    probs = jnp.asarray(probs, jnp.float32)
    k = ids.shape[-1]
    valid = (ids >= 0) & (probs > 0)
    same = (ids[..., :, None] == ids[..., None, :]) & valid[..., :, None] & valid[..., None, :]
    earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # [j, l]: l before j
    is_first = valid & ~jnp.any(same & earlier, axis=-1)
    summed = jnp.where(is_first, jnp.sum(jnp.where(same, probs[..., None, :], 0.0), axis=-1), 0.0)
    total = jnp.sum(summed, axis=-1, keepdims=True)
    kk = min(k_out, k)
    top, order = jax.lax.top_k(summed, kk)  # ties → lower index first, as the stable argsort
    has = top > 0
    out_ids = jnp.where(has, jnp.take_along_axis(ids, order, axis=-1), 0)
    out_lp = jnp.where(has, jnp.log(jnp.where(has, top, 1.0) / jnp.where(total > 0, total, 1.0)), -jnp.inf)
    if kk < k_out:
        pad = [(0, 0)] * (ids.ndim - 1) + [(0, k_out - kk)]
        out_ids = jnp.pad(out_ids, pad)
        out_lp = jnp.pad(out_lp, pad, constant_values=-jnp.inf)
    return out_ids.astype(jnp.int32), out_lp.astype(jnp.float32)


def _chunk(Ts: int, chunk: int) -> int:
    c = min(chunk, Ts)
    return c if Ts % c == 0 else math.gcd(Ts, c)


def online_rows(teacher: OnlineTeacher, params, vocab_map: jax.Array, inputs: Mapping[str, Any], rules=None) -> dict:
    """One online teacher's loader inputs (leading dimension b) → its rows, as a cached teacher's loader dict:
    ``ids int32[b, T, k]``, ``logprobs float32[b, T, k]``, ``kind int8[b, T]``, ``seq_ce``/``seq_bpb float32[b]``.

    ``vocab_map`` int32[V ≥ the model's top-k ids] (−1 = unmapped). Nothing here is differentiated."""
    params = jax.lax.stop_gradient(params)
    tokens, seg = inputs["src_tokens"], inputs["src_segment_ids"]
    Ts = tokens.shape[1]
    lp, ids, ce = topk_step(teacher.model, teacher.candidates, _chunk(Ts, teacher.logits_chunk), rules, params,
                            tokens, seg)
    gather = inputs["gather"]
    found = gather >= 0
    g = jnp.maximum(gather, 0)[..., None]
    g_lp = jnp.take_along_axis(lp, g, axis=1)    # [b, T, topk]
    g_ids = jnp.take_along_axis(ids, g, axis=1)
    vmap = jnp.asarray(vocab_map, jnp.int32)
    mapped = jnp.where(found[..., None], vmap[jnp.clip(g_ids, 0, vmap.shape[0] - 1)], -1)
    mapped = jnp.where(g_ids < vmap.shape[0], mapped, -1)
    out_ids, out_lp = merge_rows(mapped, jnp.exp(g_lp), teacher.k)
    has_row = jnp.isfinite(out_lp[..., 0])
    kind = jnp.where(has_row, ROW_TEACHER, ROW_EMPTY)
    if teacher.fallback == "onehot_next":
        nxt = inputs["next_ids"]
        fill = ~has_row & (nxt >= 0)
        first = jnp.arange(teacher.k) == 0
        out_ids = jnp.where(fill[..., None], jnp.where(first, nxt[..., None], 0), out_ids)
        out_lp = jnp.where(fill[..., None], jnp.where(first, 0.0, -jnp.inf), out_lp)
        kind = jnp.where(fill, ROW_ONEHOT, kind)
    scored = ~jnp.isnan(ce)
    n = scored.sum(-1)
    nats = jnp.sum(jnp.where(scored, ce, 0.0), -1)
    next_bytes = jnp.concatenate([inputs["src_token_bytes"][:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    nbytes = jnp.sum(jnp.where(scored, next_bytes, 0), -1).astype(jnp.float32)
    seq_ce = jnp.where(n > 0, nats / jnp.maximum(n, 1), jnp.nan)
    seq_bpb = jnp.where(nbytes > 0, nats / (math.log(2) * jnp.maximum(nbytes, 1.0)), jnp.nan)
    rows = {"ids": out_ids, "logprobs": out_lp, "kind": kind.astype(jnp.int8), "seq_ce": seq_ce.astype(jnp.float32),
            "seq_bpb": seq_bpb.astype(jnp.float32)}
    return jax.tree.map(jax.lax.stop_gradient, rows)


def micro(x: jax.Array, a: int) -> jax.Array:
    """[B, ...] → [A, B/A, ...]: rows i, i+A, … for micro-batch i (each device keeps its own rows); the train step
    splits its batch with it too."""
    return jnp.swapaxes(x.reshape(x.shape[0] // a, a, *x.shape[1:]), 0, 1)


def _unmicro(x: jax.Array) -> jax.Array:
    """Inverse of :func:`micro`."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def teacher_dicts(batch_teachers: Sequence[Mapping[str, Any]], online: Sequence[OnlineTeacher], frozen,
                  rules=None, accumulation: int = 1) -> list[dict]:
    """The batch's teacher dicts with every online teacher's inputs replaced by its rows (config order kept).

    ``online``: the online teachers in the order they appear in ``batch_teachers``; ``frozen``: a matching sequence
    of ``{"params": ..., "vocab_map": int32[V]}``. ``accumulation`` > 1 runs the teachers one micro-batch at a time.
    """
    n_online = sum(is_online(t) for t in batch_teachers)
    if n_online != len(online) or len(frozen or ()) != len(online):
        raise ValueError(f"the batch has {n_online} online teachers but the step was built for {len(online)} with "
                         f"{len(frozen or ())} frozen parameter sets: pass make_train_step(online=...) and the frozen "
                         "params (fusion_jax.fusion.online.load_frozen) for every online teacher, in config order")
    out, i = [], 0
    for t in batch_teachers:
        if not is_online(t):
            out.append(dict(t))
            continue
        spec, fz = online[i], frozen[i]
        i += 1
        inputs = {key: t[key] for key in ONLINE_INPUTS}
        if accumulation > 1:
            rows = jax.lax.map(lambda mb, spec=spec, fz=fz: online_rows(spec, fz["params"], fz["vocab_map"], mb, rules),
                               jax.tree.map(lambda x: micro(x, accumulation), inputs))
            rows = jax.tree.map(_unmicro, rows)
        else:
            rows = online_rows(spec, fz["params"], fz["vocab_map"], inputs, rules)
        out.append(rows)
    return out


def stack_teachers(batch_teachers, online: Sequence[OnlineTeacher] = (), frozen=(), rules=None,
                   accumulation: int = 1) -> TeacherRows:
    """:meth:`TeacherRows.stack` over cached and online teachers alike."""
    if not online and not any(is_online(t) for t in batch_teachers):
        return TeacherRows.stack(batch_teachers)
    return TeacherRows.stack(teacher_dicts(batch_teachers, online, frozen, rules, accumulation))


def overflow(batch_teachers) -> jax.Array:
    """int32[number of online teachers]: source tokens of the batch that did not fit their teacher's block."""
    counts = [jnp.sum(t["src_overflow"]).astype(jnp.int32) for t in batch_teachers if is_online(t)]
    return jnp.stack(counts) if counts else jnp.zeros((0,), jnp.int32)


# ------------------------------------------------------------------------------------------------ host side


def padded_vocab_map(table: np.ndarray, vocab_size: int) -> np.ndarray:
    """A tokenizer's vocab map int32[V_tok] → int32[vocab_size] of the model (a padded embedding's extra rows map
    to −1, so a top-k candidate there is dropped)."""
    table = np.asarray(table, np.int32)
    if len(table) > vocab_size:
        raise CheckpointError(f"the vocab map has {len(table)} entries but the model only {vocab_size} rows: the teacher's "
                         "tokenizer has ids its model cannot produce")
    return np.concatenate([table, np.full(vocab_size - len(table), -1, np.int32)])


def load_frozen(checkpoints: Sequence[str], vocab_maps: Sequence[np.ndarray], mesh, rules, *,
                param_dtype: str = "bfloat16", compute_dtype: str = "bfloat16") -> tuple[list[ModelConfig], tuple]:
    """Load each online teacher once, in its shards on ``mesh`` (``checkpoint.load``), in ``param_dtype`` →
    (model configs, frozen: a tuple of ``{"params", "vocab_map"}``, the vocab maps padded to the model's vocab and
    replicated)."""
    from fusion_jax.convert import checkpoint

    replicated = jax.NamedSharding(mesh, jax.P())
    cfgs, frozen = [], []
    for path, table in zip(checkpoints, vocab_maps):
        cfg, params = checkpoint.load(path, mesh, rules, param_dtype=param_dtype, compute_dtype=compute_dtype)
        vmap = jax.device_put(padded_vocab_map(table, cfg.vocab_size), replicated)
        cfgs.append(cfg)
        frozen.append({"params": params, "vocab_map": vmap})
    return cfgs, tuple(frozen)


def frozen_shardings(frozen):
    return jax.tree.map(lambda x: x.sharding, frozen)
