"""GGUF files (llama.cpp's format) read as if they were Hugging Face checkpoints.

`GGUFCheckpoint` offers what `hf.load_hf_params` reads from an `HFCheckpoint` — `config` (the HF config.json dict,
from the GGUF metadata), `model_type`, `weight_map` (HF tensor name → GGUF tensor name), `header`, `dtype`, `read` —
so a GGUF file goes through the same architecture table, checks and sharded placement as a safetensors directory.
`read` dequantizes one tensor to float32 (`gguf.quants.dequantize`) under its HF name and layout, undoing what
llama.cpp's converter changed: the q/k row permutation of llama-family attention (llama, Mistral) and the q/k/v
order of GPT-NeoX's fused projection. Only numpy is needed (no torch).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from fusion_jax.convert import gguf_config
from fusion_jax.convert.architectures import UnsupportedModelError, architecture
from fusion_jax.errors import CheckpointError
from fusion_jax.tokenizers.gguf import MAGIC, is_gguf

REDOWNLOAD = "download the GGUF file again, or convert it again with llama.cpp's convert_hf_to_gguf.py"
# What gguf.quants.dequantize reads (gguf 0.19): the float types, the legacy and k-quants, i-quants and ternary.
SUPPORTED_TYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0, Q.MXFP4,
})
# HF model_type → the gguf package's architecture (for its HF → GGUF tensor-name table).
_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
          "gpt_neox": gguf.MODEL_ARCH.GPTNEOX, "mpt": gguf.MODEL_ARCH.MPT}


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    w: [n_head·head_dim, ...] (a weight [out, in] or a bias [out]) with each head's rows ordered as llama.cpp's
    interleaved RoPE wants them → the same shape in Hugging Face's half-split order.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def neox_qkv_to_hf(w: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-NeoX's fused QKV as llama.cpp stores it, [q; k; v] with shape [3·N·H, ...], → Hugging Face's per-head
    interleaving [N, 3, H, ...] flattened to the same shape."""
    return w.reshape(3, n_head, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _hf_names(model_type: str, cfg) -> dict[str, str]:
    """{GGUF tensor name: HF tensor name} for every tensor the architecture reads, via the gguf package's table."""
    table = gguf.get_tensor_name_map(_ARCHS[model_type], cfg.num_layers)
    out = {}
    for g in architecture(model_type).groups(cfg):
        for layer in range(cfg.num_layers) if g.layered else [None]:
            for hf_name in (n.format(i=layer) for n in g.hf):
                base, _, suffix = hf_name.rpartition(".")
                name = table.get_name(base)
                if name is not None:
                    out[f"{name}.{suffix}"] = hf_name
    return out


def _open(path: Path) -> gguf.GGUFReader:
    if not is_gguf(path):
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with {MAGIC!r}); {REDOWNLOAD}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:  # a truncated file or a damaged header
        raise CheckpointError(f"{path}: cannot be read as GGUF ({e}): the file is truncated or corrupted; "
                              f"{REDOWNLOAD}") from None


class GGUFCheckpoint:
    """One GGUF file seen as a Hugging Face checkpoint (the interface of `hf.HFCheckpoint`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        reader = _open(self.path)
        self._tensors = {t.name: t for t in reader.tensors}
        shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in self._tensors.items()}
        self.config = gguf_config.hf_config(reader.fields, shapes, self.path)
        cfg = architecture(self.model_type).config_from_hf(self.config)
        hf_of = _hf_names(self.model_type, cfg)
        self._check_names(hf_of)
        self.weight_map: dict[str, str] = {hf_of[n]: n for n in self._tensors if n in hf_of}
        self._shapes = {h: shapes[n] for h, n in self.weight_map.items()}
        self._heads = {}
        if self.model_type in ("llama", "mistral"):
            self._heads = {h: cfg.num_heads if ".q_proj." in h else cfg.num_kv_heads
                           for h in self.weight_map if ".q_proj." in h or ".k_proj." in h}
        self._check_types()

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    def _check_names(self, hf_of: dict[str, str]) -> None:
        """GGUF tensors that map to nothing the model reads: an error (MPT's optional copy of the embedding as
        `output.weight` is allowed when it is that copy)."""
        extra = sorted(n for n in self._tensors if n not in hf_of)
        if self.model_type == "mpt" and "output.weight" in extra:
            out, embd = self._tensors["output.weight"], self._tensors.get("token_embd.weight")
            if embd is None or not np.array_equal(out.data, embd.data):
                raise UnsupportedModelError(f"{self.path}: an MPT model whose output.weight differs from "
                                            "token_embd.weight (untied embeddings) is not supported")
            extra.remove("output.weight")
        if extra:
            raise CheckpointError(f"{self.path}: GGUF tensors that a {self.model_type} model does not have "
                                  f"({len(extra)}): {', '.join(extra[:8])}{' …' if len(extra) > 8 else ''}; is its "
                                  f"general.architecture right? {REDOWNLOAD}")

    def _check_types(self) -> None:
        bad = [f"{n} ({self._tensors[n].tensor_type.name})" for n in sorted(self.weight_map.values())
               if self._tensors[n].tensor_type not in SUPPORTED_TYPES]
        if bad:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise CheckpointError(f"{self.path}: tensors of a quantization type that cannot be dequantized "
                                  f"({len(bad)}): {', '.join(bad[:8])}{' …' if len(bad) > 8 else ''}; supported "
                                  f"types: {supported}. Quantize the model again to one of them (llama-quantize)")

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(HF-order shape, "F32"): every tensor is read as float32."""
        return self._shapes[name], "F32"

    def dtype(self) -> str:
        """float32: the dequantized values exactly (most GGUF files mix quantized and float tensors)."""
        return "float32"

    def read(self, name: str) -> np.ndarray:
        """The HF tensor `name` as float32 in Hugging Face's layout."""
        t = self._tensors[self.weight_map[name]]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            w = w.reshape(self._shapes[name])
        except (ValueError, gguf.quants.QuantError) as e:
            raise CheckpointError(f"{self.path}: tensor {t.name} ({t.tensor_type.name}) cannot be read ({e}); "
                                  f"{REDOWNLOAD}") from None
        if name in self._heads:
            w = unpermute_rows(w, self._heads[name])
        elif self.model_type == "gpt_neox" and ".query_key_value." in name:
            w = neox_qkv_to_hf(w, self.config["num_attention_heads"])
        return np.ascontiguousarray(w)
