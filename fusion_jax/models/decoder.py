"""The decoder: parameter layout, abstract and sharded init, and the pure forward pass.

Params are a nested dict of arrays. Layers are stacked on a leading axis and run by `jax.lax.scan`, so compile
time does not grow with depth; `cfg.remat` picks the rematerialisation policy of the scanned body.

    embed      [V, D]        final_norm {scale [D], bias [D]?}     lm_head [D, V] (absent when tied)
    layers/attn_norm, mlp_norm  {scale [L, D], bias [L, D]?}
    layers/attn {q [L, D, N, H], k [L, D, K, H], v [L, D, K, H], o [L, N, H, D], q_bias …, o_bias [L, D]}
    layers/mlp  {gate [L, D, F]?, up [L, D, F], down [L, F, D], *_bias}
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.models import layers

Params = dict[str, Any]
Rules = dict[str, tuple[str, ...]]


class ParamSpec:
    """Shape, logical axis names and initialiser of one parameter."""

    __slots__ = ("shape", "logical", "init")

    def __init__(self, shape: tuple[int, ...], logical: tuple[str | None, ...], init: str):
        self.shape, self.logical, self.init = shape, logical, init

    def __repr__(self) -> str:
        return f"ParamSpec({self.shape}, {self.logical}, {self.init})"


def param_specs(cfg: ModelConfig) -> Params:
    """The parameter tree of `cfg` as ParamSpecs (same nesting as the params)."""
    L, D, N, K, H, F, V = (
        cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.intermediate_size, cfg.vocab_size,
    )

    def norm(*lead):
        lead_names = ("layers",) * len(lead)
        p = {"scale": ParamSpec((*lead, D), (*lead_names, "embed"), "ones")}
        if cfg.norm == "layer" and cfg.norm_bias:
            p["bias"] = ParamSpec((*lead, D), (*lead_names, "embed"), "zeros")
        return p

    attn = {
        "q": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), "normal"),
        "k": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "v": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "o": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), "normal"),
    }
    if cfg.qkv_bias:
        attn["q_bias"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros")
        attn["k_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        attn["v_bias"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.out_bias:
        attn["o_bias"] = ParamSpec((L, D), ("layers", "embed"), "zeros")
    mlp = {
        "up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal"),
    }
    if cfg.mlp == "gated":
        mlp["gate"] = ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal")
    if cfg.mlp_bias:
        mlp.update({f"{n}_bias": ParamSpec((L, F), ("layers", "mlp"), "zeros") for n in mlp if n != "down"})
        mlp["down_bias"] = ParamSpec((L, D), ("layers", "embed"), "zeros")
    tree = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": {"attn_norm": norm(L), "attn": attn, "mlp_norm": norm(L), "mlp": mlp},
        "final_norm": norm(),
    }
    if not cfg.tie_embeddings:
        tree["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return tree


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def logical_axes(cfg: ModelConfig) -> Params:
    return jax.tree.map(lambda s: s.logical, param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig) -> Params:
    """ShapeDtypeStructs of the params, without allocating anything."""
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg), is_leaf=_is_spec)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules) -> Params:
    return mesh_lib.tree_shardings(mesh, rules, logical_axes(cfg), abstract_params(cfg))


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random params (normal(std) matrices, unit scales, zero biases). Pure; jit it with out_shardings."""
    specs = param_specs(cfg)
    flat, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(flat))
    dtype = jnp.dtype(cfg.param_dtype)

    def one(spec: ParamSpec, k):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(flat, keys)])


def init_sharded(cfg: ModelConfig, key: jax.Array, mesh: Mesh, rules: Rules) -> Params:
    """Params created directly in their shards: no host ever holds the whole model."""
    return jax.jit(lambda k: init_params(cfg, k), out_shardings=param_shardings(cfg, mesh, rules))(key)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """int [B, T] segment ids → int32 [B, T] position of each token within its segment (packed documents)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


_REMAT: dict[str, Callable | None] = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def hidden_states(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rules: Rules | None = None,
) -> jax.Array:
    """tokens int [B, T], segment_ids int [B, T] (0 = padding; default one segment) → final-normed hidden [B, T, D].

    Tokens attend causally within their own segment; positions restart at each segment unless given.
    `rules` (with a mesh set by `jax.set_mesh`) constrains activations to the batch sharding.
    """
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = segment_positions(segment_ids)
    dt = jnp.dtype(cfg.compute_dtype)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dt)
    x = mesh_lib.constrain(x, ("batch", "seq", None), rules)
    mask = layers.attention_mask(cfg, segment_ids)
    rope = layers.rope_cos_sin(cfg, positions) if cfg.position == "rope" else None

    def body(h, layer_params):
        h = layers.block(cfg, layer_params, h, mask, rope, positions)
        return mesh_lib.constrain(h, ("batch", "seq", None), rules), None

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, params["layers"])
    return layers.norm(cfg, params["final_norm"], x)


def unembed(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] → float32 logits [..., V] (tied embeddings use embed [V, D] transposed)."""
    dt = hidden.dtype
    if cfg.tie_embeddings:
        return jnp.einsum("...d,vd->...v", hidden, params["embed"].astype(dt), preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", hidden, params["lm_head"].astype(dt), preferred_element_type=jnp.float32)


def apply(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rules: Rules | None = None,
) -> jax.Array:
    """The model: tokens int [B, T] (+ segment_ids [B, T]) → float32 logits [B, T, V]. Pure; jit it."""
    return unembed(cfg, params, hidden_states(cfg, params, tokens, segment_ids, positions, rules))
