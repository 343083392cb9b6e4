"""Forward-pass throughput: our jitted decoder vs the transformers PyTorch model, on CPU, in one process.

Builds a tiny Hugging Face model of the chosen architecture (or takes a real one with --model DIR), saves it as
safetensors, loads the same weights with `fusion_jax.convert.load`, checks the two give the same logits, then
times full forward passes (tokens -> logits) on the same random tokens. Reports the median tokens/s of each and
their ratio (ours / transformers; > 1 means we are faster). Ours runs on a single device (one-device mesh), so a
forced multi-device CPU platform (XLA_FLAGS) does not replicate the work.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/forward.py                       # llama, built tiny model
    HF_HUB_OFFLINE=1 .venv/bin/python bench/forward.py --arch mpt --repeats 7
    HF_HUB_OFFLINE=1 .venv/bin/python bench/forward.py --model /path/to/hf_checkpoint --batch 1 --seq 512

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from fusion_jax import mesh as mesh_lib
from fusion_jax.convert import load
from fusion_jax.models import apply


def hf_config(a: argparse.Namespace) -> transformers.PretrainedConfig:
    common = dict(vocab_size=a.vocab, num_hidden_layers=a.layers, num_attention_heads=a.heads, hidden_size=a.hidden)
    if a.arch == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, intermediate_size=a.intermediate)
    if a.arch == "mpt":  # transformers' MptMLP is always 4·d_model wide, so --intermediate does not apply
        return transformers.MptConfig(d_model=a.hidden, n_heads=a.heads, n_layers=a.layers, vocab_size=a.vocab)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}
    return cls[a.arch](**common, num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model options shared by the benches that compare with transformers (this one, bench/generate.py)."""
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "gpt_neox", "mpt"])
    p.add_argument("--model", help="a Hugging Face checkpoint dir to use instead of a built model (sizes ignored)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=768)


def build_models(a: argparse.Namespace, compute_dtype: str):
    """(the transformers model in eval mode, our config, our params on one device) with the same weights."""
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        if a.model:
            path = a.model
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            path = tmp
            hf_model = transformers.AutoModelForCausalLM.from_config(hf_config(a), dtype=torch.float32)
            hf_model.save_pretrained(path)
        one_device = mesh_lib.make_mesh(mesh_lib.MeshConfig(), devices=jax.devices()[:1])
        cfg, params = load(path, mesh=one_device, compute_dtype=compute_dtype)
    return hf_model.eval(), cfg, params


def interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds of each fn; runs alternate (a, b, a, b, ...) so both see the same machine noise."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    a = p.parse_args()

    hf_model, cfg, params = build_models(a, a.dtype)

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, a.seq), dtype=np.int32)
    tokens_jax = jax.device_put(tokens, jax.devices()[0])
    tokens_torch = torch.from_numpy(tokens.astype(np.int64))
    forward = jax.jit(lambda p, t: apply(cfg, p, t))

    t0 = time.perf_counter()
    ours_logits = np.asarray(forward(params, tokens_jax).block_until_ready())  # warm-up = compile
    compile_s = time.perf_counter() - t0
    with torch.inference_mode():
        torch_logits = hf_model(tokens_torch).logits.float().numpy()  # warm-up
        ours_s, torch_s = interleaved_medians(
            [lambda: forward(params, tokens_jax).block_until_ready(), lambda: hf_model(tokens_torch)], a.repeats
        )
    diff = float(np.max(np.abs(ours_logits - torch_logits)))

    n = a.batch * a.seq
    ours, base = n / ours_s, n / torch_s
    small = dict(arch=hf_model.config.model_type, hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_heads,
                 kv_heads=cfg.num_kv_heads, intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
                 batch=a.batch, seq=a.seq, dtype=a.dtype)
    print(f"config: {small}  (params {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M, torch threads {torch.get_num_threads()}, "
          f"HF attention {hf_model.config._attn_implementation}, jax devices {jax.device_count()})")
    print(f"max |logits ours - transformers| = {diff:.2e}   (our compile + first run {compile_s:.1f}s)")
    print(f"{'':28}{'median s/forward':>18}{'tokens/s':>12}")
    print(f"{'fusion_jax (jit, ' + a.dtype + ')':28}{ours_s:18.4f}{ours:12.0f}")
    print(f"{'transformers (torch, fp32)':28}{torch_s:18.4f}{base:12.0f}")
    print(f"{'ratio ours/transformers':28}{'':18}{ours / base:12.2f}")
    if a.dtype == "float32" and diff > 1e-3:  # bf16 differs by rounding; only fp32 must match this closely
        raise SystemExit(f"FAIL: fp32 logits differ by {diff:.2e} > 1e-3: our model does not match transformers")
    result = {"metric": "forward_tokens_per_s_vs_transformers_pytorch", "unit": "tokens/s", "ours": round(ours, 1),
              "baseline": round(base, 1), "ratio": round(ours / base, 3), "max_abs_diff": diff, "config": small}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
