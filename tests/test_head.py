"""The chunked vocabulary head (models/head.py) against a naive reference: full logits → log_softmax → top-k, CE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import DEFAULT_RULES
from fusion_jax.mesh import MeshConfig, make_mesh
from fusion_jax.models import apply, decoder, param_shardings
from fusion_jax.models.head import ce_step, map_chunks, topk_step

B, T, V, K = 8, 24, 97, 5


def model(tie: bool):
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      compute_dtype="float32", tie_embeddings=tie)
    return cfg, decoder.init_params(cfg, jax.random.key(3), std=0.4)


def batch(seed: int = 0):
    """Rows of three documents each, the last positions padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    segs = np.repeat(np.arange(1, 4), T // 3)[None].repeat(B, 0).astype(np.int32)
    segs[:, -3:] = 0
    tokens[segs == 0] = 0
    return tokens, segs


def naive(cfg, params, tokens, segs):
    """(log-probs float64[B, T, V], has_next bool[B, T], CE of the next token float64[B, T] where has_next)."""
    logp = np.asarray(jax.nn.log_softmax(apply(cfg, params, tokens, segs), axis=-1), np.float64)
    has_next = np.zeros((B, T), bool)
    has_next[:, :-1] = (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] > 0)
    nxt = np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
    ce = -np.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
    return logp, has_next, np.where(has_next, ce, np.nan)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [8, 24, 64])
def test_topk_step_equals_full_log_softmax(tie, chunk):
    cfg, params = model(tie)
    tokens, segs = batch()
    lp, ids, ce = jax.jit(lambda p, t, s: topk_step(cfg, K, chunk, None, p, t, s))(params, tokens, segs)
    logp, has_next, ce_ref = naive(cfg, params, tokens, segs)
    order = np.argsort(-logp, axis=-1, kind="stable")[..., :K]
    np.testing.assert_array_equal(np.asarray(ids), order)
    np.testing.assert_allclose(lp, np.take_along_axis(logp, order, axis=-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.isnan(ce), ~has_next)
    np.testing.assert_allclose(np.asarray(ce)[has_next], ce_ref[has_next], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [5, 8, 24, 64])  # 5: T is not a multiple, the last chunk is padded
def test_ce_step_equals_full_log_softmax(tie, chunk):
    cfg, params = model(tie)
    tokens, segs = batch(1)
    _, has_next, ce_ref = naive(cfg, params, tokens, segs)
    score = has_next & (np.random.default_rng(2).random((B, T)) < 0.7)
    ce = np.asarray(jax.jit(lambda p, t, s, m: ce_step(cfg, chunk, None, p, t, s, m))(params, tokens, segs, score))
    np.testing.assert_array_equal(ce[~score], 0.0)
    np.testing.assert_allclose(ce[score], ce_ref[score], rtol=1e-5, atol=1e-5)


def test_topk_step_per_device_rows_equal_one_device():
    """On a mesh the top-k runs per device over its own rows (shard_map): the same values as without a mesh."""
    cfg, params = model(False)
    tokens, segs = batch(3)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    sharded = jax.device_put(params, param_shardings(cfg, mesh, DEFAULT_RULES))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda p, t, s: topk_step(cfg, K, 8, DEFAULT_RULES, p, t, s))(sharded, tokens, segs)
    want = jax.jit(lambda p, t, s: topk_step(cfg, K, 8, None, p, t, s))(params, tokens, segs)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    for g, w in [(got[0], want[0]), (got[2], want[2])]:
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 10, 30])
def test_map_chunks_is_the_whole_function(chunk):
    """Position-wise functions over a pytree of outputs: chunked = at once, bit for bit, padding sliced off."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 10, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, (3, 10)), jnp.int32)
    fn = lambda a, i: (jnp.take_along_axis(a, i[..., None], axis=-1)[..., 0] * 2.0, {"e": jnp.exp(a)})
    got, want = map_chunks(fn, (x, y), chunk), fn(x, y)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1]["e"], want[1]["e"])
