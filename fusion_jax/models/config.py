"""ModelConfig: one decoder family, configured by flags.

Llama-2/3, OpenLLaMA, Mistral and Qwen2 are pre-norm RMSNorm decoders with gated-SiLU MLPs and RoPE (Qwen2 adds
q/k/v biases); GPT-NeoX/Pythia adds LayerNorm with bias, partial rotary and a parallel residual; MPT uses ALiBi,
bias-free LayerNorm and clip_qkv. Every difference is a field here, so there is one `apply` for all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` is Llama-3.1's smooth interpolation; `linear` divides positions."""

    kind: Literal["llama3", "linear"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one decoder. Sizes follow HF names where they exist."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_heads

    norm: Literal["rms", "layer"] = "rms"
    norm_bias: bool = False
    norm_eps: float = 1e-6
    mlp: Literal["gated", "plain"] = "gated"
    activation: Activation = "silu"
    mlp_bias: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    parallel_residual: bool = False
    tie_embeddings: bool = False

    position: Literal["rope", "alibi"] = "rope"
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # GPT-NeoX rotary_pct: only the first part of each head rotates
    rope_scaling: RopeScaling | None = None
    alibi_bias_max: float = 8.0
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    clip_qkv: float | None = None
    sliding_window: int | None = None

    param_dtype: DType = "float32"
    compute_dtype: DType = "bfloat16"
    remat: RematPolicy = "none"
    attention_impl: Literal["xla", "cudnn", "auto"] = "xla"

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rotary_fraction)

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
        if self.position == "rope" and self.rotary_dim % 2:
            raise ValueError(f"rotary dimension {self.rotary_dim} (head_dim x rotary_fraction) must be even")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
