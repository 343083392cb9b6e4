"""Greedy generation throughput: our jitted KV-cache decoder vs transformers' `generate` (PyTorch, its own KV cache),
on CPU, in one process.

Builds a small Hugging Face model (bench/forward.py's architectures and sizes, or --model DIR), loads the same
weights with `fusion_jax.convert.load`, checks that both generate the same greedy tokens for the same prompts, then
times generating --new tokens for a batch of prompts (ours: `models.decode` prefill + `lax.while_loop` decode, one
device; transformers: `generate(do_sample=False)`). Reports the median new tokens/s of each and their ratio (ours /
transformers; > 1 means we are faster).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generate.py
    HF_HUB_OFFLINE=1 .venv/bin/python bench/generate.py --arch gpt_neox --batch 1 --new 128

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import add_model_arguments, build_models, interleaved_medians  # noqa: E402

from fusion_jax.config.schema import SamplingConfig  # noqa: E402
from fusion_jax.models import decode  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    hf_model, cfg, params = build_models(a, "float32")

    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, a.prompt), dtype=np.int32)
    valid = np.ones_like(prompts, bool)
    keys = jnp.zeros((a.batch, 2), jnp.uint32)
    slots = a.prompt + a.new
    prefill = jax.jit(lambda pa, t, v, k: decode.prefill(cfg, pa, t, v, k, a.new, slots))
    steps = jax.jit(lambda pa, s: decode.decode(cfg, pa, s, a.new, SamplingConfig(), ()))

    def ours():
        return np.asarray(steps(params, prefill(params, prompts, valid, keys))["tokens"])

    prompts_torch = torch.from_numpy(prompts.astype(np.int64))

    def theirs():
        with torch.inference_mode():
            out = hf_model.generate(prompts_torch, attention_mask=torch.ones_like(prompts_torch), do_sample=False,
                                    max_new_tokens=a.new, min_new_tokens=a.new, eos_token_id=None, pad_token_id=0)
        return out[:, a.prompt:].numpy()

    same = bool((ours() == theirs()).all())  # warm-up (our compile) and the parity check
    ours_s, torch_s = interleaved_medians([ours, theirs], a.repeats)
    n = a.batch * a.new
    mine, base = n / ours_s, n / torch_s
    small = dict(arch=hf_model.config.model_type, hidden=cfg.hidden_size, layers=cfg.num_layers, vocab=cfg.vocab_size,
                 batch=a.batch, prompt=a.prompt, new=a.new)
    print(f"config: {small}  (torch threads {torch.get_num_threads()}, jax devices {jax.device_count()})")
    print(f"{'':34}{'median s':>10}{'new tokens/s':>14}")
    print(f"{'fusion_jax (KV cache, jit)':34}{ours_s:10.3f}{mine:14.0f}")
    print(f"{'transformers generate (torch)':34}{torch_s:10.3f}{base:14.0f}")
    print(f"{'ratio ours/transformers':34}{'':10}{mine / base:14.2f}")
    if not same:
        raise SystemExit("FAIL: greedy tokens differ from transformers' generate")
    print(json.dumps({"metric": "greedy_generate_tokens_per_s_vs_transformers", "unit": "new tokens/s",
                      "ours": round(mine, 1), "baseline": round(base, 1), "ratio": round(mine / base, 3),
                      "same_tokens": same, "config": small}))


if __name__ == "__main__":
    main()
