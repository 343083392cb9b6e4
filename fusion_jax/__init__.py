"""fusion_jax: knowledge fusion of LLMs with different tokenizers (FuseLLM) in JAX, on TPU and GPU meshes."""

__version__ = "0.1.0"
