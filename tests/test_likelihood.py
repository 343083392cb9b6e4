"""Likelihood matching on byte chunks (fusion/likelihood.py): the kernel against a naive float64 reference (values),
against a naive JAX loop through the whole loss (gradients), the closed-form gradient of the binary KL, the mix with
the top-k term, chunked logits, and 1 vs 8 devices."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from chunk_batches import random_chunks
from fusion_jax.fusion import FusedTarget, LossConfig, TeacherChunks, sparse_losses, total_loss
from fusion_jax.fusion.likelihood import EPSILON, binary_kl, chunk_logprobs, likelihood_terms
from fusion_jax.mesh import MeshConfig, make_mesh

B, T, D, V, K = 8, 14, 8, 30, 2


def problem(seed: int):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(0, 1, (B, T, D)).astype(np.float32)
    w = rng.normal(0, 1, (D, V)).astype(np.float32)
    labels = rng.integers(0, V, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[1, T // 2:] = 2
    seg[2, T - 3:] = 0
    seg[3] = 0
    loss_mask = (seg != 0) & (np.roll(seg, -1, 1) == seg)
    loss_mask[:, -1] = False
    pairs = [random_chunks(rng, loss_mask) for _ in range(K)]
    chunks = TeacherChunks(np.stack([p[0] for p in pairs], -1), np.stack([p[1] for p in pairs], -1))
    weights = np.zeros((B, T, K), np.float32)
    weights[..., 0] = rng.random((B, T)) < 0.5   # one-hot shares (MinCE), some positions with none
    weights[..., 1] = 1.0 - weights[..., 0]
    weights[5] = rng.dirichlet(np.ones(K), T)     # a block with soft shares (AvgCE)
    weights[6, :, :] = 0.0                        # a block without a target anywhere
    ids = rng.integers(0, V, (B, T, 3)).astype(np.int32)
    probs = rng.dirichlet(np.ones(3), (B, T)).astype(np.float32)
    target = FusedTarget(ids, probs, weights, weights.sum(-1) > 0)
    return hidden, w, labels, loss_mask, target, chunks


def naive_terms(logits, labels, loss_mask, chunks, weights, tau):
    """float64 loops: per position the share-weighted binary KL over the teachers with a chunk ending there."""
    z = np.asarray(logits, np.float64)
    logq = z - z.max(-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    loss, mask = np.zeros((B, T)), np.zeros((B, T), bool)
    for b in range(B):
        for t in range(T):
            num = den = 0.0
            for j in range(K):
                s = int(chunks.start[b, t, j])
                if s < 0 or weights[b, t, j] == 0:
                    continue
                student = sum(logq[b, u, labels[b, u]] for u in range(s, t + 1) if loss_mask[b, u])
                la = min(float(chunks.logprob[b, t, j]) / tau, -EPSILON)
                lb = min(student / tau, -EPSILON)
                a, q = np.exp(la), np.exp(lb)
                num += weights[b, t, j] * (a * (la - lb) + (1 - a) * (np.log1p(-a) - np.log1p(-q)))
                den += weights[b, t, j]
            if den > 0:
                loss[b, t], mask[b, t] = num / den, True
    return loss, mask


@pytest.mark.parametrize("tau", [1.0, 100.0])
def test_terms_match_naive(tau):
    hidden, w, labels, loss_mask, target, chunks = problem(0)
    logits = hidden @ w
    logq = jax.nn.log_softmax(jnp.asarray(logits), -1)
    token_lp = jnp.where(loss_mask, jnp.take_along_axis(logq, labels[..., None], -1)[..., 0], 0.0)
    got, mask = jax.jit(likelihood_terms, static_argnums=3)(token_lp, chunks, target.weights, tau)
    ref, ref_mask = naive_terms(logits, labels, loss_mask, chunks, target.weights, tau)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask)
    assert ref_mask.sum() > 20 and not ref_mask[6].any()
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=1e-6)


def test_chunk_logprobs_are_sums_over_the_chunk():
    rng = np.random.default_rng(1)
    lp = -rng.random((2, 9)).astype(np.float32)
    start = np.full((2, 9, 1), -1, np.int32)
    start[0, 3, 0], start[0, 8, 0], start[1, 0, 0], start[1, 5, 0] = 0, 4, 0, 2
    got = np.asarray(chunk_logprobs(jnp.asarray(lp), jnp.asarray(start)))[..., 0]
    want = np.zeros((2, 9), np.float32)
    want[0, 3], want[0, 8], want[1, 0], want[1, 5] = lp[0, :4].sum(), lp[0, 4:].sum(), lp[1, 0], lp[1, 2:6].sum()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_binary_kl_value_and_gradient():
    """0 at a match, positive elsewhere; d/d log p_S = (b − a)/(τ(1 − b)); no gradient to the teacher."""
    teacher = jnp.array([-0.5, -3.0, -20.0, -1e-9, -2.0])
    student = jnp.array([-0.5, -1.0, -40.0, -2.0, -1e-9])
    for tau in (1.0, 10.0):
        kl = binary_kl(teacher, student, tau)
        assert float(kl[0]) == pytest.approx(0.0, abs=1e-6) and bool(jnp.all(kl[1:] > 0))
        g_teacher, g_student = jax.grad(lambda t, s: binary_kl(t, s, tau).sum(), argnums=(0, 1))(teacher, student)
        a = np.exp(np.minimum(np.asarray(teacher, np.float64) / tau, -EPSILON))
        lb = np.asarray(student, np.float64) / tau
        b = np.exp(np.minimum(lb, -EPSILON))
        want = np.where(lb < -EPSILON, (b - a) / (tau * (1 - b)), 0.0)  # clipped at −ε: no gradient
        np.testing.assert_allclose(np.asarray(g_student), want, rtol=1e-3, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(g_teacher), 0.0)


def _loss_fn(cfg):
    def fn(hidden, w, labels, loss_mask, target, chunks):
        out = sparse_losses(lambda h: h @ w, hidden, labels, loss_mask, target, loss_mask, cfg, chunks)
        return total_loss(cfg, out), out
    return fn


def naive_total(cfg, hidden, w, labels, loss_mask, target, chunks):
    """The whole loss with dense logits and Python loops over chunks (JAX, for its gradients)."""
    logq = jax.nn.log_softmax(hidden @ w, -1)
    token_lp = jnp.take_along_axis(logq, jnp.asarray(labels)[..., None], -1)[..., 0]
    m = jnp.asarray(loss_mask)
    clm = -jnp.sum(jnp.where(m, token_lp, 0.0)) / m.sum()
    fmask = m & jnp.asarray(target.has_target)
    fus = -jnp.sum(jnp.where(fmask, jnp.sum(target.probs * jnp.take_along_axis(logq, target.ids, -1), -1), 0.0))
    fus = fus / fmask.sum()
    num, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            parts = [(j, int(chunks.start[b, t, j])) for j in range(K)
                     if chunks.start[b, t, j] >= 0 and target.weights[b, t, j] > 0]
            if not parts:
                continue
            den = sum(float(target.weights[b, t, j]) for j, _ in parts)
            for j, s in parts:
                student = jnp.sum(token_lp[b, s:t + 1])
                kl = binary_kl(jnp.float32(chunks.logprob[b, t, j]), student, cfg.likelihood_temperature)
                num = num + float(target.weights[b, t, j]) / den * kl
            count += 1
    lik = num / count
    mu, lam = cfg.likelihood_weight, cfg.lm_weight
    return lam * clm + (1 - lam) * ((1 - mu) * fus + mu * lik)


@pytest.mark.parametrize("mu,tau", [(0.5, 1.0), (1.0, 100.0)])
def test_loss_and_gradients_match_naive(mu, tau):
    hidden, w, labels, loss_mask, target, chunks = problem(2)
    cfg = LossConfig(lm_weight=0.3, likelihood_weight=mu, likelihood_temperature=tau)
    (tot, out), g = jax.jit(jax.value_and_grad(_loss_fn(cfg), argnums=(0, 1), has_aux=True))(
        hidden, w, labels, loss_mask, target, chunks)
    ref_tot, ref_g = jax.value_and_grad(naive_total, argnums=(1, 2))(cfg, hidden, w, labels, loss_mask, target, chunks)
    np.testing.assert_allclose(float(tot), float(ref_tot), rtol=1e-5)
    for a, r in zip(g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)
    assert float(out["likelihood"]) > 0 and float(out["likelihood_tokens"]) > 20


def test_off_by_default_and_needs_chunks():
    hidden, w, labels, loss_mask, target, chunks = problem(3)
    off = _loss_fn(LossConfig())(hidden, w, labels, loss_mask, target, None)[1]
    assert float(off["likelihood"]) == 0.0 and float(off["likelihood_tokens"]) == 0.0
    on = _loss_fn(LossConfig(likelihood_weight=0.5))(hidden, w, labels, loss_mask, target, chunks)[1]
    np.testing.assert_allclose(float(on["clm"]), float(off["clm"]), rtol=1e-6)  # the other terms do not change
    np.testing.assert_allclose(float(on["fusion"]), float(off["fusion"]), rtol=1e-6)
    with pytest.raises(ValueError, match="needs the teachers' chunks"):
        _loss_fn(LossConfig(likelihood_weight=0.5))(hidden, w, labels, loss_mask, target, None)


@pytest.mark.parametrize("reduction", ["tokens", "blocks"])
def test_chunked_logits_equal_unchunked(reduction):
    hidden, w, labels, loss_mask, target, chunks = problem(4)
    cfg = LossConfig(likelihood_weight=0.7, likelihood_temperature=3.0, reduction=reduction)
    step = lambda c: jax.jit(jax.value_and_grad(_loss_fn(c), argnums=(0, 1), has_aux=True))(
        hidden, w, labels, loss_mask, target, chunks)
    (t0, o0), g0 = step(cfg)
    (t1, o1), g1 = step(dataclasses.replace(cfg, chunk_size=4))
    np.testing.assert_allclose(float(t1), float(t0), rtol=1e-6)
    np.testing.assert_allclose(float(o1["likelihood"]), float(o0["likelihood"]), rtol=1e-6)
    for a, r in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-7)


def test_sharded_equals_single_device():
    hidden, w, labels, loss_mask, target, chunks = problem(5)
    cfg = LossConfig(lm_weight=0.5, likelihood_weight=0.5, likelihood_temperature=10.0, chunk_size=5)
    step = jax.jit(jax.value_and_grad(_loss_fn(cfg), argnums=(0, 1), has_aux=True))
    args = (hidden, w, labels, loss_mask, target, chunks)
    (ref_tot, ref_out), ref_g = step(*jax.device_put(args, jax.devices()[0]))
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    bs = NamedSharding(mesh, P(("data", "fsdp")))
    shard = (bs, NamedSharding(mesh, P("fsdp", None)), bs, bs, FusedTarget(bs, bs, bs, bs), TeacherChunks(bs, bs))
    (tot, out), g = step(*jax.device_put(args, shard))
    assert len(g[0].sharding.device_set) == 8
    np.testing.assert_allclose(float(tot), float(ref_tot), rtol=1e-6)
    np.testing.assert_allclose(float(out["likelihood"]), float(ref_out["likelihood"]), rtol=1e-6)
    for a, r in zip(g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-7)
