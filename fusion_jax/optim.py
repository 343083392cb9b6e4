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

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from fusion_jax.config_loader import option as _help


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = _help("peak learning rate (FuseLLM: 1e-5)", 1e-5, exclusive_minimum=0)
    schedule: Literal["cosine", "as_run", "constant"] = _help(
        "cosine: warmup + cosine (the official flags); as_run: DeepSpeed's log warmup + linear decay (what the official "
        "runs executed); constant: warmup then flat", "cosine")
    warmup_ratio: float = _help("share of the steps spent warming up (FuseLLM: 0.008)", 0.008, minimum=0,
                                exclusive_maximum=1)
    min_lr_ratio: float = _help("cosine: final learning rate as a share of the peak", 0.0, minimum=0, maximum=1)
    b1: float = _help("Adam β1", 0.9, minimum=0, exclusive_maximum=1)
    b2: float = _help("Adam β2 (official flags 0.95; the as-run DeepSpeed optimizer used 0.999)", 0.95, minimum=0,
                      exclusive_maximum=1)
    eps: float = _help("Adam ε", 1e-8, exclusive_minimum=0)
    weight_decay: float = _help("decoupled weight decay on matrices (not on norms or biases)", 0.0, minimum=0)
    grad_clip: float = _help("clip the global gradient norm to this (0 = off)", 1.0, minimum=0)
    accumulation: int = _help("micro-batches per optimizer step (each is global_batch_size / accumulation rows)", 1,
                              minimum=1)


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
