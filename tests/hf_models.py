"""Tiny random transformers models, one per supported architecture, built in the tests (no hub)."""

from __future__ import annotations

import numpy as np

VOCAB = 64


def hf_configs() -> dict:
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": T.LlamaConfig(**common, num_key_value_heads=2),
        "llama3": T.LlamaConfig(
            **common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16},
        ),
        "mistral": T.MistralConfig(**common, num_key_value_heads=1, sliding_window=6),
        "qwen2": T.Qwen2Config(**common, num_key_value_heads=2),
        "gpt_neox": T.GPTNeoXConfig(**common),
        "gpt_neox_sequential": T.GPTNeoXConfig(**common, use_parallel_residual=False, rotary_pct=0.5),
        "mpt": T.MptConfig(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=6, attn_config={"clip_qkv": 0.5}),
    }


def build(name: str, seed: int = 0):
    """A transformers model with random weights (norms and biases perturbed too), eager attention, eval mode."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_configs()[name], attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.as_tensor(tokens)).logits.float().numpy()
