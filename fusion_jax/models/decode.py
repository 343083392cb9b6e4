"""Autoregressive decoding with a KV cache: prefill a batch of left-padded prompts, then one token per step.

Pure functions over the params tree (jit them; :mod:`fusion_jax.evaluate.generate` does, on the mesh). The state of
a batch being decoded is a dict:

    k, v       [L, B, S, K, H]  the cache (compute dtype), S slots per row
    positions  int32 [B, S]     position of the token in each slot (its index among the row's real tokens)
    valid      bool [B, S]      the slot holds a real token (left padding and slots not yet written are False)
    index      int32 []         the slot the next token goes to (the same for every row: prompts are left-padded)
    logits     float32 [B, V]   the next-token logits of each row
    done       bool [B]         the row emitted an EOS id (or was stopped by its caller): it takes no more tokens
    tokens     int32 [B, M]     the tokens generated so far (M = max new tokens; 0 after a row is done)
    steps      int32 []         how many of them
    keys       uint32 [B, 2]    one PRNG key per row: a row's samples depend on its key only, not on its batch
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import SamplingConfig
from fusion_jax.models import layers
from fusion_jax.models.decoder import Params, Rules, unembed

State = dict[str, Any]
CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")


def init_cache(cfg: ModelConfig, batch: int, slots: int) -> State:
    """An empty cache of `slots` slots per row: k, v zeros [L, B, S, K, H], positions 0, valid False [B, S]."""
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.dim_per_head)
    dt = jnp.dtype(cfg.compute_dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
            "positions": jnp.zeros((batch, slots), jnp.int32), "valid": jnp.zeros((batch, slots), bool)}


def extend(cfg: ModelConfig, params: Params, cache: State, tokens: jax.Array, valid: jax.Array, index: jax.Array,
           rules: Rules | None = None) -> tuple[jax.Array, State]:
    """Write t new tokens per row into slots index .. index+t-1 and run them through the model.

    cache: init_cache's fields; tokens int [B, t]; valid bool [B, t] (False: padding, takes no position and is never
    attended to); index int32 []. Each new token attends to the row's valid slots up to its own (and, with a sliding
    window, within it). Returns the float32 logits [B, V] of each row's last new token and the updated cache.
    """
    b, t = tokens.shape
    slots = cache["valid"].shape[1]
    seen = jnp.sum(cache["valid"], axis=1, dtype=jnp.int32)
    positions = jnp.maximum(seen[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    all_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, index))
    all_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
    query_slot = index + jnp.arange(t)
    mask = all_valid[:, None, :] & (jnp.arange(slots)[None, None, :] <= query_slot[None, :, None])
    if cfg.sliding_window is not None:
        mask &= positions[:, :, None] - all_positions[:, None, :] < cfg.sliding_window
    mask = mask[:, None]  # [B, 1, t, S]
    rope = layers.rope_cos_sin(cfg, positions) if cfg.position == "rope" else None

    x = jnp.take(params["embed"], tokens, axis=0).astype(jnp.dtype(cfg.compute_dtype))
    x = mesh_lib.constrain(x, ("batch", "seq", None), rules)

    def body(carry, layer):
        h, keys, values = carry
        p, i = layer
        q, k, v = layers.project_qkv(cfg, p["attn"], layers.norm(cfg, p["attn_norm"], h), rope)
        keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), (i, 0, index, 0, 0))
        values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), (i, 0, index, 0, 0))
        a = layers.attend(cfg, p["attn"], q, keys[i], values[i], mask, positions, all_positions)
        h = mesh_lib.constrain(layers.residual(cfg, p, h, a), ("batch", "seq", None), rules)
        return (h, keys, values), None

    (x, keys, values), _ = jax.lax.scan(body, (x, cache["k"], cache["v"]),
                                        (params["layers"], jnp.arange(cfg.num_layers)))
    keys, values = (mesh_lib.constrain(a, CACHE_AXES, rules) for a in (keys, values))
    last = layers.norm(cfg, params["final_norm"], x[:, -1])
    return unembed(cfg, params, last), {"k": keys, "v": values, "positions": all_positions, "valid": all_valid}


def prefill(cfg: ModelConfig, params: Params, prompts: jax.Array, prompt_valid: jax.Array, keys: jax.Array,
            max_new_tokens: int, slots: int, rules: Rules | None = None) -> State:
    """The decoding state after reading the prompts. prompts int [B, P] left-padded (prompt_valid bool [B, P] False
    on the padding; every row needs at least one real token); keys uint32 [B, 2]; slots >= P + max_new_tokens."""
    b, p = prompts.shape
    if slots < p + max_new_tokens:
        raise ValueError(f"slots {slots} < prompt length {p} + max_new_tokens {max_new_tokens}")
    cache = init_cache(cfg, b, slots)
    logits, cache = extend(cfg, params, cache, prompts, prompt_valid, jnp.int32(0), rules)
    return {**cache, "index": jnp.int32(p), "logits": logits, "done": jnp.zeros((b,), bool),
            "tokens": jnp.zeros((b, max_new_tokens), jnp.int32), "steps": jnp.int32(0), "keys": keys}


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """float32 [B, V] logits / temperature, with -inf outside the top-k and outside the top-p nucleus (the fewest
    most likely tokens whose probabilities sum to at least top_p; the most likely token always stays)."""
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < sampling.top_p, ordered, jnp.inf)
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, keys: jax.Array, step: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """float32 [B, V] logits → int32 [B] next tokens: the argmax at temperature 0, else a draw from
    filter_logits(logits) with row b's key keys[b] folded with `step`."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sampling)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    return jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)


def decode(cfg: ModelConfig, params: Params, state: State, num_steps: int, sampling: SamplingConfig,
           eos_ids: tuple[int, ...], rules: Rules | None = None) -> State:
    """Up to `num_steps` more tokens per row (fewer when every row is done or `tokens` is full). A row is done after
    it emits one of `eos_ids` (kept as its last token); done rows add zeros and no more slots to attend to."""
    max_new = state["tokens"].shape[1]
    stop_at = jnp.minimum(state["steps"] + num_steps, max_new)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def running(s):
        return (s["steps"] < stop_at) & ~jnp.all(s["done"])

    def step(s):
        token = jnp.where(s["done"], 0, sample(s["logits"], s["keys"], s["steps"], sampling))
        tokens = jax.lax.dynamic_update_slice(s["tokens"], token[:, None], (0, s["steps"]))
        cache = {k: s[k] for k in ("k", "v", "positions", "valid")}
        logits, cache = extend(cfg, params, cache, token[:, None], ~s["done"][:, None], s["index"], rules)
        done = s["done"] | jnp.isin(token, eos)
        return {**s, **cache, "logits": logits, "tokens": tokens, "done": done, "index": s["index"] + 1,
                "steps": s["steps"] + 1}

    return jax.lax.while_loop(running, step, state)
