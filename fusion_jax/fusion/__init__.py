"""Jitted fusion kernels: fuse K sparse teacher rows into one sparse target (`fuse`), and the sparse losses
(CLM + fusion CE/KL from one log-sum-exp per position, optionally over sequence chunks)."""

from fusion_jax.fusion.fuse import FusedTarget, FusionConfig, TeacherRows, fuse
from fusion_jax.fusion.likelihood import TeacherChunks
from fusion_jax.fusion.losses import (LossConfig, block_means, fusion_term, lm_weight, make_fusion_mask, sparse_losses,
                                      total_loss)

__all__ = [
    "FusedTarget",
    "FusionConfig",
    "LossConfig",
    "TeacherChunks",
    "TeacherRows",
    "block_means",
    "fuse",
    "fusion_term",
    "lm_weight",
    "make_fusion_mask",
    "sparse_losses",
    "total_loss",
]
