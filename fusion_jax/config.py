"""The run's config tree: typed, frozen, loaded from YAML with `--set key=value` overrides.

Loading, validation and error messages live in `config_loader`; this module only declares the sections.
"""

from __future__ import annotations

import dataclasses

from fusion_jax.config_loader import option as _help
from fusion_jax.mesh import MeshConfig
from fusion_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """`python -m fusion_jax.forward`: score text (or random tokens) with a model on the mesh."""

    batch_size: int = _help("sequences per batch (a multiple of the data·fsdp mesh size)", 8, minimum=1)
    seq_len: int = _help("tokens per sequence", 128, minimum=1)
    steps: int = _help("timed forward passes after the compiling one", 3, minimum=1)
    text: str | None = _help("UTF-8 text file to score with the checkpoint's tokenizer (default: random tokens)", None)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = _help("architecture and numerics (ignored when checkpoint is set)", default_factory=ModelConfig)
    checkpoint: str | None = _help("fusion_jax or Hugging Face model directory to load instead of a random init", None)
    mesh: MeshConfig = _help("device mesh and sharding rules", default_factory=MeshConfig)
    seed: int = _help("random seed", 0)
    forward: ForwardConfig = _help("the forward job", default_factory=ForwardConfig)
