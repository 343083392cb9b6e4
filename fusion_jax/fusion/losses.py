"""The FuseLLM objective on sparse targets: L = λ·CLM + (1−λ)·fusion, from one log-sum-exp per position.

The fusion term is the top-k one below, or with ``likelihood_weight`` μ > 0 a mix ``(1−μ)·top-k + μ·likelihood``,
the latter being likelihood matching on byte chunks (:mod:`fusion_jax.fusion.likelihood`, from the same per-token
log-probabilities as the CLM term; it needs the teachers' chunks).

With student logits z_t (float32, [V]) and ``lse_t = logsumexp(z_t)``:

* CLM at t: ``lse_t − z_t[label_t]`` where ``clm_mask`` (the loader's ``loss_mask``: next label in the same segment).
* fusion CE at t: ``Σ_e p_e · (lse_t − z_t[id_e])`` over the fused target's entries (``p`` sums to 1; an exact
  equivalent of the official ``cross_entropy(z, dense_target)`` since ``p`` is 0 off its support, and also of it
  when bf16 rounding leaves ``Σp ≠ 1``, because the official loss is linear in the dense target too).
  ``fusion_loss="kl"``: CE − H(p), the official ``kl_div`` value (same gradients). Counted where the fusion mask holds
  and the target exists (``FusedTarget.has_target``).
* The fusion mask (:func:`make_fusion_mask`): ``next_label`` = ``loss_mask`` (FuseChat's fix), ``attention`` = every
  non-pad position (``segment_ids != 0``), the official code's mask, which includes each block's last position.

Reductions (``reduction``): ``tokens`` = one mean over the whole (global) batch: Σ loss / Σ mask — what the official
``compute_loss`` computes for a micro-batch of B > 1 blocks (and the golden cases, B = 3); ``blocks`` = the mean over
blocks of each block's own mean, which is the official run's effective loss (per-device batch 1, averaged over
gradient accumulation and data parallelism). Blocks with no counted position are left out of that mean; a train
step split into micro-batches divides each micro-batch's sum of :func:`block_means` by the whole batch's count of
non-empty blocks, so accumulation does not change the loss.

``chunk_size > 0`` computes the logits ``chunk_size`` positions at a time (:func:`fusion_jax.models.head.map_chunks`,
a ``lax.map``) in a body under ``jax.checkpoint``: neither the forward nor the backward pass holds a float32
[B, T, V] buffer, only [B, C, V].
A chunk size that does not divide T is fine (the last chunk is padded and the padding sliced off).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fusion_jax.config.schema import LossConfig
from fusion_jax.fusion.fuse import FusedTarget
from fusion_jax.fusion.likelihood import TeacherChunks, likelihood_terms
from fusion_jax.models.head import map_chunks


def lm_weight(cfg: LossConfig, step: Any = 0, max_steps: Any = 1) -> jax.Array:
    """λ at ``step`` (a float32 scalar; step may be traced). hard_and_decay: λ + (1−λ)·step/max_steps, with
    step/max_steps clipped to [0, 1]."""
    lam = jnp.float32(cfg.lm_weight)
    if cfg.lm_weight_schedule == "constant":
        return lam
    if isinstance(max_steps, (int, float)) and max_steps <= 0:
        raise ValueError(f"hard_and_decay needs max_steps > 0, got {max_steps}")
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.asarray(max_steps, jnp.float32), 0.0, 1.0)
    return lam + (1.0 - lam) * frac


def fusion_term(cfg: LossConfig, fusion: jax.Array, likelihood: jax.Array) -> jax.Array:
    """(1−μ)·top-k fusion + μ·likelihood matching (μ = ``likelihood_weight``; the top-k term alone at μ = 0)."""
    mu = float(cfg.likelihood_weight)
    return fusion if mu == 0.0 else (1.0 - mu) * fusion + mu * likelihood


def total_loss(cfg: LossConfig, losses: dict, step: Any = 0, max_steps: Any = 1) -> jax.Array:
    """λ·clm + (1−λ)·fusion term."""
    lam = lm_weight(cfg, step, max_steps)
    return lam * losses["clm"] + (1.0 - lam) * fusion_term(cfg, losses["fusion"], losses.get("likelihood", 0.0))


def make_fusion_mask(cfg: LossConfig, loss_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """bool[B, T] positions of the fusion term per ``cfg.fusion_mask`` (from the loader's batch)."""
    if cfg.fusion_mask == "next_label":
        return jnp.asarray(loss_mask, bool)
    return jnp.asarray(segment_ids) != 0


def block_means(block_sum: jax.Array, block_tokens: jax.Array) -> jax.Array:
    """float32[B] each block's mean loss, 0 for a block without counted positions (it is left out of the
    ``blocks`` reduction: divide the sum of these by the number of non-empty blocks, over the whole batch)."""
    return jnp.where(block_tokens > 0, block_sum / jnp.maximum(block_tokens, 1.0), 0.0)


def _reduce(per_token: jax.Array, mask: jax.Array, reduction: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    block_sum = jnp.sum(per_token, axis=1)
    block_tokens = jnp.sum(mask, axis=1).astype(jnp.float32)
    if reduction == "tokens":
        value = jnp.sum(block_sum) / jnp.maximum(jnp.sum(block_tokens), 1.0)
    else:
        non_empty = jnp.sum(block_tokens > 0)
        value = jnp.sum(block_means(block_sum, block_tokens)) / jnp.maximum(non_empty, 1).astype(jnp.float32)
    return value, block_sum, block_tokens


def sparse_losses(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    labels: jax.Array,
    clm_mask: jax.Array,
    target: FusedTarget,
    fusion_mask: jax.Array,
    cfg: LossConfig,
    chunks: TeacherChunks | None = None,
) -> dict[str, jax.Array]:
    """CLM and fusion losses without a dense teacher tensor (see the module docstring).

    ``logits_fn(hidden_chunk [B, C, D]) → logits [B, C, V]`` (float32; e.g.
    ``functools.partial(decoder.unembed, model_cfg, params)``),
    ``hidden [B, T, D]``, ``labels int32[B, T]`` (the next token at each position), ``clm_mask bool[B, T]``,
    ``target`` from :func:`~fusion_jax.fusion.fuse.fuse`, ``fusion_mask bool[B, T]`` (:func:`make_fusion_mask`),
    ``chunks`` the teachers' byte chunks (needed when ``cfg.likelihood_weight > 0``).

    Returns float32 values: ``clm``, ``fusion`` (reduced per ``cfg.reduction``), ``clm_tokens``, ``fusion_tokens``
    (global counts), ``clm_block_sum``/``clm_block_tokens``/``fusion_block_sum``/``fusion_block_tokens`` [B] (for
    accumulating over micro-batches), ``clm_per_token``/``fusion_per_token`` [B, T] (0 where masked), and the same
    for ``likelihood`` (zeros when ``likelihood_weight`` is 0; its tokens are the chunks counted).
    The target gets no gradient.
    """
    B, T = labels.shape
    cmask = jnp.asarray(clm_mask, bool)
    fmask = jnp.asarray(fusion_mask, bool) & jnp.asarray(target.has_target, bool)
    probs = jax.lax.stop_gradient(jnp.asarray(target.probs, jnp.float32))
    ids = jnp.asarray(target.ids, jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)

    def body(h, lab, tid, tp):
        z = logits_fn(h).astype(jnp.float32)  # [B, C, V]
        v = z.shape[-1]
        lse = jax.nn.logsumexp(z, axis=-1)
        z_lab = jnp.take_along_axis(z, jnp.clip(lab, 0, v - 1)[..., None], axis=-1)[..., 0]
        z_ids = jnp.take_along_axis(z, jnp.clip(tid, 0, v - 1), axis=-1)
        return lse - z_lab, jnp.sum(tp * (lse[..., None] - z_ids), axis=-1)

    c = cfg.chunk_size
    if c <= 0 or c >= T:
        clm, ce = body(hidden, labels, ids, probs)
    else:
        clm, ce = map_chunks(jax.checkpoint(body, prevent_cse=False), (hidden, labels, ids, probs), c)

    if cfg.fusion_loss == "kl":
        neg_entropy = jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
        fus = ce + neg_entropy
    else:
        fus = ce
    clm = jnp.where(cmask, clm, 0.0)
    fus = jnp.where(fmask, fus, 0.0)
    if cfg.likelihood_weight > 0:
        if chunks is None:
            raise ValueError("likelihood_weight > 0 needs the teachers' chunks (TeacherChunks.stack of the batch)")
        lik, lmask = likelihood_terms(-clm, chunks, target.weights, cfg.likelihood_temperature)
    else:
        lik, lmask = jnp.zeros((B, T), jnp.float32), jnp.zeros((B, T), bool)
    clm_value, clm_block_sum, clm_block_tokens = _reduce(clm, cmask, cfg.reduction)
    fus_value, fus_block_sum, fus_block_tokens = _reduce(fus, fmask, cfg.reduction)
    lik_value, lik_block_sum, lik_block_tokens = _reduce(lik, lmask, cfg.reduction)
    return {
        "clm": clm_value,
        "fusion": fus_value,
        "clm_tokens": jnp.sum(clm_block_tokens),
        "fusion_tokens": jnp.sum(fus_block_tokens),
        "clm_block_sum": clm_block_sum,
        "clm_block_tokens": clm_block_tokens,
        "fusion_block_sum": fus_block_sum,
        "fusion_block_tokens": fus_block_tokens,
        "clm_per_token": clm,
        "fusion_per_token": fus,
        "likelihood": lik_value,
        "likelihood_tokens": jnp.sum(lik_block_tokens),
        "likelihood_block_sum": lik_block_sum,
        "likelihood_block_tokens": lik_block_tokens,
        "likelihood_per_token": lik,
    }
