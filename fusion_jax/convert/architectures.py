"""Per-architecture maps between Hugging Face checkpoints and our ModelConfig + params.

Each architecture says how to read and write its `config.json` and lists its tensors as `TensorGroup`s: one or more
HF tensors ↔ one or more of our params, with the layout change in both directions (HF Linear weights are
[out, in]; ours are [in, ...out] with heads split out). Per-layer tensors are named with `{i}` and stacked on our
leading layer axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from fusion_jax.config.model import ModelConfig, RopeScaling
from fusion_jax.errors import CheckpointError

Path = tuple[str, ...]
Arrays = list[np.ndarray]


class UnsupportedModelError(CheckpointError):
    pass


@dataclasses.dataclass(frozen=True)
class TensorGroup:
    """HF tensors `hf` ↔ our params `ours`, one layer at a time (no layer axis).

    to_ours(hf_arrays, our_shapes) → our arrays; to_hf(our_arrays) → HF arrays.
    """

    hf: tuple[str, ...]
    ours: tuple[Path, ...]
    to_ours: Callable[[Arrays, list[tuple[int, ...]]], Arrays]
    to_hf: Callable[[Arrays], Arrays]
    layered: bool = True


def _linear(hf: str, path: Path, in_dims: int, layered: bool = True) -> TensorGroup:
    """HF Linear weight [out, in] ↔ ours [in…, out…]; the first `in_dims` dims of ours make up `in`."""
    return TensorGroup(
        (hf,),
        (path,),
        lambda a, shapes: [a[0].T.reshape(shapes[0])],
        lambda a: [a[0].reshape(int(np.prod(a[0].shape[:in_dims])), -1).T],
        layered,
    )


def _vector(hf: str, path: Path, layered: bool = True) -> TensorGroup:
    """A 1-D HF tensor (norm scale, bias) ↔ ours of any shape with the same elements ([N*H] ↔ [N, H])."""
    return TensorGroup((hf,), (path,), lambda a, shapes: [a[0].reshape(shapes[0])], lambda a: [a[0].reshape(-1)], layered)


def _same(hf: str, path: Path) -> TensorGroup:
    return TensorGroup((hf,), (path,), lambda a, shapes: [a[0]], lambda a: [a[0]], False)


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None, float]:
    """(theta, scaling, partial rotary fraction) from transformers-5 `rope_parameters` or the older keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    source = params if params.get("rope_type") not in (None, "default") else {**params, **legacy}
    theta = float(params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))))
    fraction = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))))
    if kind == "default":
        return theta, None, fraction
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(source["factor"])), fraction
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(source["factor"]),
            low_freq_factor=float(source["low_freq_factor"]),
            high_freq_factor=float(source["high_freq_factor"]),
            original_max_position=int(source["original_max_position_embeddings"]),
        ), fraction
    raise UnsupportedModelError(f"rope type {kind!r} is not supported; supported: default, linear, llama3")


def _rope_to_hf(cfg: ModelConfig) -> dict:
    params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    s = cfg.rope_scaling
    if s is not None and s.kind == "linear":
        params.update(rope_type="linear", factor=s.factor)
    elif s is not None:
        params.update(
            rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_position,
        )
    if cfg.rotary_fraction != 1.0:
        params["partial_rotary_factor"] = cfg.rotary_fraction
    return params


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACTIVATIONS_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _activation(hf: dict, key: str) -> str:
    name = hf.get(key, "silu")
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"{key}={name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class Architecture:
    """One HF family. Subclasses define the config map and the tensor groups."""

    model_types: tuple[str, ...] = ()

    def config_from_hf(self, hf: dict, **overrides) -> ModelConfig:
        raise NotImplementedError

    def config_to_hf(self, cfg: ModelConfig) -> dict:
        raise NotImplementedError

    def groups(self, cfg: ModelConfig) -> list[TensorGroup]:
        raise NotImplementedError


class Llama(Architecture):
    """Llama-2/3, OpenLLaMA, Mistral, Qwen2 (q/k/v biases)."""

    model_types = ("llama", "mistral", "qwen2")

    def config_from_hf(self, hf: dict, **overrides) -> ModelConfig:
        theta, scaling, _ = _rope_from_hf(hf)
        qwen = hf["model_type"] == "qwen2"
        window = hf.get("sliding_window")
        if qwen and not hf.get("use_sliding_window", False):
            window = None
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            norm="rms",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            mlp="gated",
            activation=_activation(hf, "hidden_act"),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qkv_bias=qwen or bool(hf.get("attention_bias", False)),
            out_bias=(not qwen) and bool(hf.get("attention_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            position="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            sliding_window=window,
        )
        return ModelConfig(**{**kwargs, **overrides})

    def config_to_hf(self, cfg: ModelConfig) -> dict:
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.dim_per_head,
            "rms_norm_eps": cfg.norm_eps,
            "hidden_act": _ACTIVATIONS_TO_HF[cfg.activation],
            "mlp_bias": cfg.mlp_bias,
            "attention_bias": cfg.out_bias,
            "tie_word_embeddings": cfg.tie_embeddings,
            "rope_parameters": _rope_to_hf(cfg),
            "sliding_window": cfg.sliding_window,
        }

    def groups(self, cfg: ModelConfig) -> list[TensorGroup]:
        a, m = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
        g = [
            _same("model.embed_tokens.weight", ("embed",)),
            _vector("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "scale")),
            _vector("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "scale")),
            _linear(f"{a}.q_proj.weight", ("layers", "attn", "q"), 1),
            _linear(f"{a}.k_proj.weight", ("layers", "attn", "k"), 1),
            _linear(f"{a}.v_proj.weight", ("layers", "attn", "v"), 1),
            _linear(f"{a}.o_proj.weight", ("layers", "attn", "o"), 2),
            _linear(f"{m}.gate_proj.weight", ("layers", "mlp", "gate"), 1),
            _linear(f"{m}.up_proj.weight", ("layers", "mlp", "up"), 1),
            _linear(f"{m}.down_proj.weight", ("layers", "mlp", "down"), 1),
            _vector("model.norm.weight", ("final_norm", "scale"), layered=False),
        ]
        if cfg.qkv_bias:
            g += [_vector(f"{a}.{n}_proj.bias", ("layers", "attn", f"{n}_bias")) for n in "qkv"]
        if cfg.out_bias:
            g.append(_vector(f"{a}.o_proj.bias", ("layers", "attn", "o_bias")))
        if cfg.mlp_bias:
            g += [_vector(f"{m}.{n}_proj.bias", ("layers", "mlp", f"{n}_bias")) for n in ("gate", "up", "down")]
        if not cfg.tie_embeddings:
            g.append(_linear("lm_head.weight", ("lm_head",), 1, layered=False))
        return g


class GPTNeoX(Architecture):
    """GPT-NeoX-20B, Pythia: LayerNorm with bias, partial rotary, parallel residual, fused per-head QKV."""

    model_types = ("gpt_neox",)

    def config_from_hf(self, hf: dict, **overrides) -> ModelConfig:
        theta, scaling, fraction = _rope_from_hf({"rotary_pct": 0.25, **hf})
        bias = bool(hf.get("attention_bias", True))
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf["num_attention_heads"],
            norm="layer",
            norm_bias=True,
            norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            mlp="plain",
            activation=_activation(hf, "hidden_act"),
            mlp_bias=True,
            qkv_bias=bias,
            out_bias=bias,
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            position="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            rotary_fraction=fraction,
        )
        return ModelConfig(**{**kwargs, **overrides})

    def config_to_hf(self, cfg: ModelConfig) -> dict:
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "layer_norm_eps": cfg.norm_eps,
            "hidden_act": _ACTIVATIONS_TO_HF[cfg.activation],
            "attention_bias": cfg.qkv_bias,
            "use_parallel_residual": cfg.parallel_residual,
            "tie_word_embeddings": cfg.tie_embeddings,
            "rope_parameters": {**_rope_to_hf(cfg), "partial_rotary_factor": cfg.rotary_fraction},
        }

    def groups(self, cfg: ModelConfig) -> list[TensorGroup]:
        n, h, d = cfg.num_heads, cfg.dim_per_head, cfg.hidden_size
        a = "gpt_neox.layers.{i}.attention"

        def split_qkv_weight(arrays, shapes):  # [N*3*H, D] interleaved per head → q, k, v [D, N, H]
            w = arrays[0].reshape(n, 3, h, d)
            return [np.ascontiguousarray(w[:, j].transpose(2, 0, 1)) for j in range(3)]

        def merge_qkv_weight(arrays):
            return [np.stack([x.transpose(1, 2, 0) for x in arrays], axis=1).reshape(n * 3 * h, d)]

        qkv = (("layers", "attn", "q"), ("layers", "attn", "k"), ("layers", "attn", "v"))
        g = [
            _same("gpt_neox.embed_in.weight", ("embed",)),
            _vector("gpt_neox.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "scale")),
            _vector("gpt_neox.layers.{i}.input_layernorm.bias", ("layers", "attn_norm", "bias")),
            _vector("gpt_neox.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "scale")),
            _vector("gpt_neox.layers.{i}.post_attention_layernorm.bias", ("layers", "mlp_norm", "bias")),
            TensorGroup((f"{a}.query_key_value.weight",), qkv, split_qkv_weight, merge_qkv_weight, True),
            _linear(f"{a}.dense.weight", ("layers", "attn", "o"), 2),
            _linear("gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight", ("layers", "mlp", "up"), 1),
            _vector("gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias", ("layers", "mlp", "up_bias")),
            _linear("gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight", ("layers", "mlp", "down"), 1),
            _vector("gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias", ("layers", "mlp", "down_bias")),
            _vector("gpt_neox.final_layer_norm.weight", ("final_norm", "scale"), layered=False),
            _vector("gpt_neox.final_layer_norm.bias", ("final_norm", "bias"), layered=False),
        ]
        if cfg.qkv_bias:
            g += [
                TensorGroup(
                    (f"{a}.query_key_value.bias",),
                    tuple((*p[:-1], p[-1] + "_bias") for p in qkv),
                    lambda arrays, shapes: list(np.moveaxis(arrays[0].reshape(n, 3, h), 1, 0)),
                    lambda arrays: [np.stack(arrays, axis=1).reshape(-1)],
                    True,
                ),
                _vector(f"{a}.dense.bias", ("layers", "attn", "o_bias")),
            ]
        if not cfg.tie_embeddings:
            g.append(_linear("embed_out.weight", ("lm_head",), 1, layered=False))
        return g


class MPT(Architecture):
    """MPT-7B/30B: ALiBi, bias-free LayerNorm, fused QKV, clip_qkv, tied embeddings."""

    model_types = ("mpt",)

    def config_from_hf(self, hf: dict, **overrides) -> ModelConfig:
        attn = hf.get("attn_config") or {}
        problems = []
        if not attn.get("alibi", False):
            problems.append("attn_config.alibi=false (learned position embeddings)")
        if attn.get("qk_ln", False):
            problems.append("attn_config.qk_ln=true")
        if attn.get("attn_type", "multihead_attention") != "multihead_attention":
            problems.append(f"attn_config.attn_type={attn['attn_type']!r}")
        if not hf.get("no_bias", True):
            problems.append("no_bias=false")
        if problems:
            raise UnsupportedModelError(
                f"this MPT variant is not supported ({', '.join(problems)}); supported: ALiBi, multi-head attention, "
                "no biases, no QK LayerNorm (MPT-7B/30B)"
            )
        d = hf["d_model"]
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=d,
            # transformers' MptMLP hard-codes 4·d_model; MPT-7B/30B use expansion_ratio 4 as well.
            intermediate_size=int(hf.get("expansion_ratio", 4) * d),
            num_layers=hf["n_layers"],
            num_heads=hf["n_heads"],
            num_kv_heads=hf["n_heads"],
            norm="layer",
            norm_bias=False,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            mlp="plain",
            activation="gelu",
            tie_embeddings=True,
            position="alibi",
            alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
            attention_scale=attn.get("softmax_scale"),
            clip_qkv=attn.get("clip_qkv"),
        )
        return ModelConfig(**{**kwargs, **overrides})

    def config_to_hf(self, cfg: ModelConfig) -> dict:
        return {
            "vocab_size": cfg.vocab_size,
            "d_model": cfg.hidden_size,
            "n_layers": cfg.num_layers,
            "n_heads": cfg.num_heads,
            "expansion_ratio": cfg.intermediate_size // cfg.hidden_size,
            "layer_norm_epsilon": cfg.norm_eps,
            "no_bias": True,
            "tie_word_embeddings": True,
            "attn_config": {
                "alibi": True,
                # transformers' MptAttentionConfig declares alibi_bias_max: int and rejects 8.0.
                "alibi_bias_max": int(cfg.alibi_bias_max) if float(cfg.alibi_bias_max).is_integer() else cfg.alibi_bias_max,
                "clip_qkv": cfg.clip_qkv,
                "softmax_scale": cfg.attention_scale,
                "attn_type": "multihead_attention",
                "qk_ln": False,
            },
        }

    def groups(self, cfg: ModelConfig) -> list[TensorGroup]:
        d = cfg.hidden_size
        b = "transformer.blocks.{i}"
        qkv = (("layers", "attn", "q"), ("layers", "attn", "k"), ("layers", "attn", "v"))
        n, h = cfg.num_heads, cfg.dim_per_head
        return [
            _same("transformer.wte.weight", ("embed",)),
            _vector(f"{b}.norm_1.weight", ("layers", "attn_norm", "scale")),
            _vector(f"{b}.norm_2.weight", ("layers", "mlp_norm", "scale")),
            TensorGroup(
                (f"{b}.attn.Wqkv.weight",),
                qkv,
                lambda arrays, shapes: [w.T.reshape(d, n, h) for w in np.split(arrays[0], 3, axis=0)],
                lambda arrays: [np.concatenate([x.reshape(d, n * h).T for x in arrays], axis=0)],
                True,
            ),
            _linear(f"{b}.attn.out_proj.weight", ("layers", "attn", "o"), 2),
            _linear(f"{b}.ffn.up_proj.weight", ("layers", "mlp", "up"), 1),
            _linear(f"{b}.ffn.down_proj.weight", ("layers", "mlp", "down"), 1),
            _vector("transformer.norm_f.weight", ("final_norm", "scale"), layered=False),
        ]


ARCHITECTURES: dict[str, Architecture] = {}
for _arch in (Llama(), GPTNeoX(), MPT()):
    ARCHITECTURES.update({t: _arch for t in _arch.model_types})

HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "mpt": "MptForCausalLM",
}


def architecture(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]
