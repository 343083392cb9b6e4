"""AdamW with gradient clipping and the learning-rate schedules of FuseLLM (fusellm.md §6.4).

* ``cosine`` ("as flagged": the official command line): linear warmup to the peak, cosine decay to
  ``min_lr_ratio · peak`` at the last step. The official flags also set β2 = 0.95.
* ``as_run`` (what DeepSpeed's ``WarmupDecayLR`` actually runs, since its config replaces the flags): logarithmic
  warmup ``peak · log(step + 1) / log(warmup_steps)`` for ``warmup_steps = ceil(warmup_ratio · steps)``, then linear
  decay to 0 at the last step; DeepSpeed's AdamW keeps torch's defaults β2 = 0.999, ε = 1e-8.
* ``constant`` (after a linear warmup).

Weight decay skips vectors (norm scales, biases), as Hugging Face's trainer does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from fusion_jax.config.schema import OptimizerConfig


def warmup_steps(cfg: OptimizerConfig, steps: int) -> int:
    return max(1, math.ceil(cfg.warmup_ratio * steps)) if cfg.warmup_ratio > 0 else 0


def schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based) for a run of ``steps`` steps."""
    peak, warm = cfg.learning_rate, warmup_steps(cfg, steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(steps, warm + 1), peak * cfg.min_lr_ratio)
    if cfg.schedule == "constant":
        return optax.linear_schedule(0.0, peak, warm) if warm else optax.constant_schedule(peak)

    def as_run(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * jnp.log(step + 1) / math.log(max(warm, 2))
        decay = peak * jnp.maximum(0.0, (steps - step) / max(steps - warm, 1))
        return jnp.where(step < warm, warmup, decay)

    return as_run


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """Clip → AdamW(schedule). Optimizer state is float32 like the master params it mirrors."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
