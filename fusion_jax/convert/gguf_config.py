"""GGUF metadata (llama.cpp's key/value header) → the Hugging Face `config.json` dict of the same model.

The dict then goes through the architecture table (`architectures.py`) exactly like a Hugging Face directory's
config.json. Keys follow llama.cpp's conventions (`{arch}.embedding_length`, `{arch}.block_count`, ...); what GGUF
does not store is read off the tensor names: tied embeddings (no `output.weight`) and biases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFValueType

from fusion_jax.convert.architectures import UnsupportedModelError
from fusion_jax.errors import CheckpointError

# GGUF general.architecture → HF model_type (llama may become mistral, see `_llama`).
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gptneox": "gpt_neox", "mpt": "mpt"}
SUPPORTED = "llama (incl. Mistral), qwen2, gptneox, mpt"
_MISSING = object()


class Metadata:
    """The key/value fields of one GGUF file (`GGUFReader.fields`, decoded on access); `arch(key)` reads
    `{general.architecture}.key`."""

    def __init__(self, fields: dict[str, Any], path: Path):
        self.fields, self.path = fields, path
        self.architecture = self.get("general.architecture", None)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.fields:
            field = self.fields[key]
            if field.types == [GGUFValueType.FLOAT32]:  # the shortest decimal of the float32: 1e-05, not 9.99…e-06
                return float(str(np.float32(field.contents())))
            return field.contents()
        if default is _MISSING:
            raise CheckpointError(f"{self.path}: the GGUF metadata has no {key!r}, which a {self.architecture} model "
                                  "needs; the file was not written by llama.cpp's converter (convert it again)")
        return default

    def arch(self, key: str, default: Any = _MISSING) -> Any:
        return self.get(f"{self.architecture}.{key}", default)

    def vocab_size(self, tensor_shapes: dict[str, tuple[int, ...]]) -> int:
        """`{arch}.vocab_size`, else the length of the token list, else the embedding's rows."""
        n = self.arch("vocab_size", None)
        if n is None and "tokenizer.ggml.tokens" in self.fields:
            n = len(self.fields["tokenizer.ggml.tokens"].data)  # (one index per string: nothing decoded)
        return int(n if n is not None else tensor_shapes["token_embd.weight"][0])


def _one(value: Any, key: str, path: Path) -> int:
    """A per-model count that some files store per layer (a list): all layers must agree."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{path}: {key} differs between layers ({sorted(set(value))}); only models "
                                        "with the same value in every layer are supported")
        value = value[0]
    return int(value)


def _rope(m: Metadata, names: set[str]) -> dict:
    """transformers-5 `rope_parameters`: theta and linear scaling (llama.cpp's rope.scaling.*)."""
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(
            f"{m.path}: this GGUF stores Llama-3.1-style RoPE scaling as a rope_freqs tensor, which does not say its "
            "parameters; convert the model from its Hugging Face checkpoint instead")
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(m.arch("rope.freq_base", 10000.0))}
    kind = m.arch("rope.scaling.type", "none")
    if kind == "linear":
        params.update(rope_type="linear", factor=float(m.arch("rope.scaling.factor")))
    elif kind != "none":
        raise UnsupportedModelError(f"{m.path}: {m.architecture}.rope.scaling.type={kind!r} is not supported; "
                                    "supported: none, linear")
    return params


def _llama(m: Metadata, shapes: dict[str, tuple[int, ...]]) -> dict:
    """llama (and Mistral, which llama.cpp also writes as llama) and qwen2."""
    names = set(shapes)
    hidden, heads = int(m.arch("embedding_length")), _one(m.arch("attention.head_count"), "head_count", m.path)
    head_dim = int(m.arch("attention.key_length", hidden // heads))
    if int(m.arch("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModelError(f"{m.path}: {m.architecture}.rope.dimension_count differs from the head size "
                                    f"{head_dim} (partial rotary), which a {m.architecture} model does not have")
    model_type = MODEL_TYPES[m.architecture]
    if model_type == "llama" and "mistral" in str(m.get("general.name", "")).lower():
        model_type = "mistral"
    return {
        "model_type": model_type,
        "vocab_size": m.vocab_size(shapes),
        "hidden_size": hidden,
        "intermediate_size": int(m.arch("feed_forward_length")),
        "num_hidden_layers": int(m.arch("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": _one(m.arch("attention.head_count_kv", heads), "head_count_kv", m.path),
        "head_dim": head_dim,
        "rms_norm_eps": float(m.arch("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(m.arch("context_length", 2048)),
        "hidden_act": "silu",
        "attention_bias": model_type != "qwen2" and "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,
        "sliding_window": m.arch("attention.sliding_window", None),
        "rope_parameters": _rope(m, names),
    }


def _gptneox(m: Metadata, shapes: dict[str, tuple[int, ...]]) -> dict:
    hidden, heads = int(m.arch("embedding_length")), int(m.arch("attention.head_count"))
    rope = _rope(m, set(shapes))
    rope["partial_rotary_factor"] = int(m.arch("rope.dimension_count", hidden // heads)) / (hidden // heads)
    return {
        "model_type": "gpt_neox",
        "vocab_size": m.vocab_size(shapes),
        "hidden_size": hidden,
        "intermediate_size": int(m.arch("feed_forward_length", 4 * hidden)),
        "num_hidden_layers": int(m.arch("block_count")),
        "num_attention_heads": heads,
        "layer_norm_eps": float(m.arch("attention.layer_norm_epsilon", 1e-5)),
        "max_position_embeddings": int(m.arch("context_length", 2048)),
        "hidden_act": "gelu",
        "attention_bias": "blk.0.attn_qkv.bias" in shapes,
        "use_parallel_residual": bool(m.arch("use_parallel_residual", True)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "rope_parameters": rope,
    }


def _mpt(m: Metadata, shapes: dict[str, tuple[int, ...]]) -> dict:
    d = int(m.arch("embedding_length"))
    return {
        "model_type": "mpt",
        "vocab_size": m.vocab_size(shapes),
        "d_model": d,
        "n_layers": int(m.arch("block_count")),
        "n_heads": int(m.arch("attention.head_count")),
        "expansion_ratio": int(m.arch("feed_forward_length", 4 * d)) // d,
        "layer_norm_epsilon": float(m.arch("attention.layer_norm_epsilon", 1e-5)),
        "max_seq_len": int(m.arch("context_length", 2048)),
        "no_bias": "blk.0.attn_qkv.bias" not in shapes,
        "tie_word_embeddings": True,
        "attn_config": {"alibi": True, "alibi_bias_max": m.arch("attention.max_alibi_bias", 8),
                        "clip_qkv": m.arch("attention.clamp_kqv", None), "softmax_scale": None,
                        "attn_type": "multihead_attention", "qk_ln": False},
    }


_BUILDERS: dict[str, Callable[[Metadata, dict], dict]] = {
    "llama": _llama, "qwen2": _llama, "gptneox": _gptneox, "mpt": _mpt}


def hf_config(fields: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], path: Path) -> dict:
    """The HF config dict of a GGUF file from its metadata `fields` (`GGUFReader.fields`) and `tensor_shapes`
    (name → shape in numpy/HF order, e.g. token_embd.weight [vocab, hidden])."""
    m = Metadata(fields, path)
    if m.architecture not in _BUILDERS:
        raise UnsupportedModelError(f"{path}: GGUF architecture {m.architecture!r} is not supported; supported: "
                                    f"{SUPPORTED}")
    return _BUILDERS[m.architecture](m, tensor_shapes)
