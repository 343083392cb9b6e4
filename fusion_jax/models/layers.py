"""Decoder building blocks as pure functions over parameter dicts.

Shapes: B batch, T sequence, D hidden, N query heads, K key/value heads, H head dim, F MLP width.
Norms and softmax accumulate in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.config.model import ModelConfig

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def norm(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    """RMSNorm or LayerNorm over the last axis. p: scale [D] (+ bias [D]); x: [..., D] → same dtype."""
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rms":
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        # HF casts back to the input dtype before scaling; keeping that order keeps bf16 parity.
        return p["scale"].astype(x.dtype) * y.astype(x.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim/2] (float32), with Llama-3 or linear scaling applied."""
    rd = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    s = cfg.rope_scaling
    if s is None or s.kind == "linear":
        return inv.astype(np.float32)
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions int [B, T] → cos, sin float32 [B, T, rotary_dim] in HF's rotate_half layout."""
    pos = positions.astype(jnp.float32)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear":
        pos = pos / cfg.rope_scaling.factor
    freqs = pos[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H]; rotates the first cos.shape[-1] dims of each head (partial rotary), rest passes."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    half = rd // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def alibi_slopes(num_heads: int, bias_max: float) -> np.ndarray:
    """Per-head ALiBi slopes [N], MPT's construction (interleaved for non-power-of-two head counts)."""
    n2 = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / np.power(2.0, np.arange(1, n2 + 1, dtype=np.float32) * (bias_max / n2))
    if n2 != num_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes.astype(np.float32)


def attention_mask(cfg: ModelConfig, segment_ids: jax.Array) -> jax.Array:
    """segment_ids int [B, T] → bool [B, 1, T, T]: causal, within one segment, inside the sliding window.

    Padding (segment 0) attends only to padding, so its rows stay finite; the loss masks them.
    """
    t = segment_ids.shape[1]
    q = jnp.arange(t)[:, None]
    k = jnp.arange(t)[None, :]
    allowed = k <= q
    if cfg.sliding_window is not None:
        allowed &= q - k < cfg.sliding_window
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (allowed[None] & same)[:, None]


def project_qkv(
    cfg: ModelConfig, p: dict, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] → q [B, T, N, H], k, v [B, T, K, H]: projections, biases, MPT's clip and RoPE.

    p: q [D, N, H], k/v [D, K, H] (+ q_bias [N, H], k_bias/v_bias [K, H]); rope (cos, sin) [B, T, R] or None.
    """
    dt = x.dtype
    q = jnp.einsum("btd,dnh->btnh", x, p["q"].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", x, p["k"].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", x, p["v"].astype(dt))
    if cfg.qkv_bias:
        q, k, v = q + p["q_bias"].astype(dt), k + p["k_bias"].astype(dt), v + p["v_bias"].astype(dt)
    if cfg.clip_qkv is not None:
        q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q, k, v


def attend(
    cfg: ModelConfig, p: dict, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
    q_positions: jax.Array, k_positions: jax.Array,
) -> jax.Array:
    """q [B, T, N, H] over k, v [B, S, K, H] (S = T, or a KV cache's length) → output projection [B, T, D].

    mask bool [B, 1, T, S]; q_positions int [B, T], k_positions int [B, S] (ALiBi's distances). p: o [N, H, D]
    (+ o_bias [D]). Grouped-query attention is native to `jax.nn.dot_product_attention` (no repeat of K/V).
    """
    dt = q.dtype
    bias = None
    if cfg.position == "alibi":
        # Softmax is shift-invariant per row, so slope·(k − q) equals MPT's slope·(k − T + 1); both use positions
        # within each segment, so packed documents match separate runs.
        rel = (k_positions[:, None, :] - q_positions[:, :, None]).astype(jnp.float32)
        bias = (jnp.asarray(alibi_slopes(cfg.num_heads, cfg.alibi_bias_max))[None, :, None, None] * rel[:, None]).astype(dt)
    scale = cfg.attention_scale if cfg.attention_scale is not None else 1.0 / math.sqrt(cfg.dim_per_head)
    impl = None if cfg.attention_impl == "auto" else cfg.attention_impl
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)
    y = jnp.einsum("btnh,nhd->btd", out, p["o"].astype(dt))
    if cfg.out_bias:
        y = y + p["o_bias"].astype(dt)
    return y


def attention(
    cfg: ModelConfig, p: dict, x: jax.Array, mask: jax.Array, rope: tuple[jax.Array, jax.Array] | None, positions: jax.Array
) -> jax.Array:
    """Self-attention. x [B, T, D]; mask bool [B, 1, T, T]; rope (cos, sin) [B, T, R] or None → [B, T, D]."""
    q, k, v = project_qkv(cfg, p, x, rope)
    return attend(cfg, p, q, k, v, mask, positions, positions)


def mlp(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    """x [B, T, D] → [B, T, D]. gated: down(act(gate x) * up x); plain: down(act(up x)). Weights [D, F], [F, D]."""
    dt = x.dtype
    act = ACTIVATIONS[cfg.activation]
    up = x @ p["up"].astype(dt)
    if cfg.mlp_bias:
        up = up + p["up_bias"].astype(dt)
    if cfg.mlp == "gated":
        gate = x @ p["gate"].astype(dt)
        if cfg.mlp_bias:
            gate = gate + p["gate_bias"].astype(dt)
        h = act(gate) * up
    else:
        h = act(up)
    y = h @ p["down"].astype(dt)
    if cfg.mlp_bias:
        y = y + p["down_bias"].astype(dt)
    return y


def block(cfg: ModelConfig, p: dict, x: jax.Array, mask: jax.Array, rope, positions: jax.Array) -> jax.Array:
    """One decoder layer. p: attn_norm, attn, mlp_norm, mlp."""
    return residual(cfg, p, x, attention(cfg, p["attn"], norm(cfg, p["attn_norm"], x), mask, rope, positions))


def residual(cfg: ModelConfig, p: dict, x: jax.Array, a: jax.Array) -> jax.Array:
    """The layer's output from its input x [B, T, D] and its attention's output a [B, T, D] (of the attn-normed x):
    sequential (x + a, then the MLP on it) or GPT-NeoX's parallel residual (x + a + MLP(x))."""
    if cfg.parallel_residual:
        return x + a + mlp(cfg, p["mlp"], norm(cfg, p["mlp_norm"], x))
    x = x + a
    return x + mlp(cfg, p["mlp"], norm(cfg, p["mlp_norm"], x))
