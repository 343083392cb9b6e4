"""Jitted fusion kernels: fuse K sparse teacher rows into one sparse target (`fuse`), and the sparse losses
(CLM + fusion CE/KL from one log-sum-exp per position, optionally over sequence chunks)."""

from fusion_jax.fusion.fuse import FusedTarget, FusionConfig, TeacherRows, fuse
from fusion_jax.fusion.losses import LossConfig, block_means, lm_weight, make_fusion_mask, sparse_losses, total_loss

__all__ = [
    "FusedTarget",
    "FusionConfig",
    "LossConfig",
    "TeacherRows",
    "block_means",
    "fuse",
    "lm_weight",
    "make_fusion_mask",
    "sparse_losses",
    "total_loss",
]
