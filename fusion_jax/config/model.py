"""ModelConfig: one decoder family, configured by flags.

Llama-2/3, OpenLLaMA, Mistral and Qwen2 are pre-norm RMSNorm decoders with gated-SiLU MLPs and RoPE (Qwen2 adds
q/k/v biases); GPT-NeoX/Pythia adds LayerNorm with bias, partial rotary and a parallel residual; MPT uses ALiBi,
bias-free LayerNorm and clip_qkv. Every difference is a field here, so there is one `apply` for all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fusion_jax.config.loader import option as _opt
from fusion_jax.errors import ConfigError

Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` is Llama-3.1's smooth interpolation; `linear` divides positions."""

    kind: Literal["llama3", "linear"] = _opt("llama3: Llama-3.1's smooth interpolation; linear: positions / factor",
                                             "llama3")
    factor: float = _opt("context extension factor", 8.0, exclusive_minimum=0)
    low_freq_factor: float = _opt("llama3: wavelengths above original_max_position / this are scaled fully", 1.0,
                                  exclusive_minimum=0)
    high_freq_factor: float = _opt("llama3: wavelengths below original_max_position / this are kept", 4.0,
                                   exclusive_minimum=0)
    original_max_position: int = _opt("llama3: the context length the model was trained on", 8192, minimum=1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one decoder. Sizes follow HF names where they exist."""

    vocab_size: int = _opt("rows of the embedding and the output head", 256, minimum=1)
    hidden_size: int = _opt("model width", 64, minimum=1)
    intermediate_size: int = _opt("MLP width", 256, minimum=1)
    num_layers: int = _opt("decoder layers", 2, minimum=1)
    num_heads: int = _opt("query heads", 4, minimum=1)
    num_kv_heads: int = _opt("key/value heads (grouped-query attention: a divisor of num_heads)", 4, minimum=1)
    head_dim: int | None = _opt("width of a head (null: hidden_size // num_heads)", None, minimum=1)

    norm: Literal["rms", "layer"] = _opt("RMSNorm or LayerNorm", "rms")
    norm_bias: bool = _opt("LayerNorm with a bias", False)
    norm_eps: float = _opt("ε of the norms", 1e-6, minimum=0)
    mlp: Literal["gated", "plain"] = _opt("gated (SwiGLU-style) or plain two-layer MLP", "gated")
    activation: Activation = _opt("MLP activation", "silu")
    mlp_bias: bool = _opt("biases in the MLP", False)
    qkv_bias: bool = _opt("biases in the q/k/v projections (Qwen2)", False)
    out_bias: bool = _opt("bias in the attention output projection", False)
    parallel_residual: bool = _opt("GPT-NeoX: attention and MLP read the same input and add to one residual", False)
    tie_embeddings: bool = _opt("the output head is the embedding", False)

    position: Literal["rope", "alibi"] = _opt("rotary embeddings or ALiBi (MPT)", "rope")
    rope_theta: float = _opt("RoPE base", 10000.0, exclusive_minimum=0)
    rotary_fraction: float = _opt("GPT-NeoX rotary_pct: share of each head that rotates", 1.0, minimum=0, maximum=1)
    rope_scaling: RopeScaling | None = _opt("RoPE frequency scaling (null: none)", None)
    alibi_bias_max: float = _opt("MPT's ALiBi maximum bias", 8.0, exclusive_minimum=0)
    attention_scale: float | None = _opt("attention logit scale (null: 1/sqrt(head_dim))", None, exclusive_minimum=0)
    clip_qkv: float | None = _opt("MPT: clip q, k, v to [-clip_qkv, clip_qkv] (null: no clipping)", None,
                                  exclusive_minimum=0)
    sliding_window: int | None = _opt("attend to at most this many previous tokens (null: all)", None, minimum=1)

    param_dtype: DType = _opt("dtype of the parameters", "float32")
    compute_dtype: DType = _opt("dtype of the activations", "bfloat16")
    remat: RematPolicy = _opt("activation checkpointing of the layers", "none")
    attention_impl: Literal["xla", "cudnn", "auto"] = _opt("attention kernel", "xla")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rotary_fraction)

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim")
        if self.position == "rope" and self.rotary_dim % 2:
            raise ConfigError(f"rotary dimension {self.rotary_dim} (head_dim x rotary_fraction) must be even")
