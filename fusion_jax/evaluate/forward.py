"""python -m fusion_jax.forward --config FILE — run a model on the device mesh and report what it costs.

Builds the mesh, loads a checkpoint (fusion_jax or Hugging Face) or initialises the configured model directly in
its shards, runs the jitted forward over text (tokenised with the checkpoint's tokenizer) or random tokens, and
prints parameters, shardings, next-token cross-entropy and tokens/s.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.schema import Config
from fusion_jax.convert import checkpoint
from fusion_jax.errors import ConfigError, InputError
from fusion_jax.models import apply, decoder

log = logging.getLogger("fusion_jax.evaluate.bpb.forward")


def next_token_ce(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) of logits [B, T, V] predicting tokens[:, 1:]."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def _batch(cfg: Config, vocab_size: int) -> np.ndarray:
    b, t = cfg.forward.batch_size, cfg.forward.seq_len
    if cfg.forward.text is None:
        return np.random.default_rng(cfg.seed).integers(0, vocab_size, (b, t), dtype=np.int32)
    if cfg.checkpoint is None:
        raise ConfigError("forward.text needs a checkpoint with a tokenizer (set checkpoint=DIR)")
    from transformers import AutoTokenizer

    try:
        text = Path(cfg.forward.text).read_text("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{cfg.forward.text}: not UTF-8 text (byte {e.start}); forward.text must be a UTF-8 "
                         "text file") from None
    ids = AutoTokenizer.from_pretrained(cfg.checkpoint)(text)["input_ids"]
    if len(ids) < b * t:
        raise InputError(f"{cfg.forward.text} has {len(ids)} tokens; forward needs batch_size·seq_len = {b * t}")
    return np.asarray(ids[: b * t], np.int32).reshape(b, t)


def main(cfg: Config) -> dict:
    mesh_lib.initialize_distributed(cfg.mesh)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    if cfg.checkpoint:
        model_cfg, params = checkpoint.load(cfg.checkpoint, mesh, rules)
    else:
        model_cfg = cfg.model
        params = decoder.init_sharded(model_cfg, jax.random.key(cfg.seed), mesh, rules)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("mesh %s; %s params (%s, compute %s)", dict(mesh.shape), f"{n_params:,}", model_cfg.param_dtype,
             model_cfg.compute_dtype)
    for path, x in jax.tree_util.tree_leaves_with_path(params)[:4]:
        log.info("  %-28s %-18s %s", jax.tree_util.keystr(path), str(x.shape), x.sharding.spec)

    tokens_np = _batch(cfg, model_cfg.vocab_size)
    batch_sharding = jax.NamedSharding(mesh, mesh_lib.logical_to_spec(("batch", "seq"), rules, mesh, tokens_np.shape))
    tokens = jax.make_array_from_process_local_data(batch_sharding, tokens_np) if jax.process_count() > 1 else \
        jax.device_put(tokens_np, batch_sharding)
    with jax.set_mesh(mesh):
        step = jax.jit(lambda p, t: next_token_ce(apply(model_cfg, p, t, rules=rules), t))
        t0 = time.perf_counter()
        ce = float(step(params, tokens))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(cfg.forward.steps):
            t0 = time.perf_counter()
            step(params, tokens).block_until_ready()
            times.append(time.perf_counter() - t0)
    tok_s = tokens_np.size / statistics.median(times)
    report = {"params": n_params, "cross_entropy": ce, "tokens_per_s": tok_s, "compile_s": compile_s}
    print(f"params {n_params:,} | next-token CE {ce:.4f} nats (uniform: {np.log(model_cfg.vocab_size):.4f}) | "
          f"{tok_s:,.0f} tokens/s | first call {compile_s:.1f}s")
    return report
