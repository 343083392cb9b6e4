"""Hugging Face ⇄ fusion_jax model conversion and the `load` API."""

from fusion_jax.convert.architectures import UnsupportedModelError, architecture
from fusion_jax.convert.checkpoint import check_tokenizer, load, save, save_hf, source_info
from fusion_jax.convert.hf import CheckpointError

__all__ = ["CheckpointError", "UnsupportedModelError", "architecture", "check_tokenizer", "load", "save", "save_hf",
           "source_info"]
