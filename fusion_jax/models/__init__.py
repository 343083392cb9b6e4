"""One decoder family (Llama/Mistral/Qwen2, GPT-NeoX, MPT) as pure functions over a params tree."""

from fusion_jax.config.model import ModelConfig, RopeScaling
from fusion_jax.models.decoder import (
    abstract_params,
    apply,
    hidden_states,
    init_params,
    init_sharded,
    logical_axes,
    param_shardings,
    param_specs,
    unembed,
)

__all__ = [
    "ModelConfig", "RopeScaling", "abstract_params", "apply", "hidden_states", "init_params", "init_sharded",
    "logical_axes", "param_shardings", "param_specs", "unembed",
]
