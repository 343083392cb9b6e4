"""Likelihood matching on byte chunks (Minixhofer et al., 2025, "Cross-Tokenizer Distillation via Approximate
Likelihood Matching"; tokenkit's ``binary_ce``): the student's log-probability of the real text, chunk by chunk,
against each teacher's log-probability of the same bytes under its own tokens.

A chunk is a span of text both tokenizations cut at (``align.chunks``). For the chunk whose last target token is
predicted at position t, the loader ships ``start[t]``, the position predicting its first token (−1 at positions
ending no chunk), and ``log p_T``, the teacher's log-probability of its own tokens over the chunk (from the cache's
per-token CE). Nothing goes through a vocabulary map, so nothing is lost to unmapped or mismatched pieces. The
student's is ``log p_S = Σ_{u=start}^{t} log q_u(label_u)``, from the same log-sum-exp as the CLM term.

Each chunk is one binary event, "the text goes on with these bytes", with probability ``a = p_T^(1/τ)`` under the
teacher and ``b = p_S^(1/τ)`` under the student; the loss is the KL between the two Bernoullis (tokenkit's binary
cross-entropy minus the teacher's entropy: the same gradients, and 0 at a perfect match)::

    ℓ = a·(log a − log b) + (1−a)·(log(1−a) − log(1−b)),   log a, log b clipped to ≤ −ε (ε = 1e−6, as tokenkit)

Its gradient in ``log p_S`` is ``(b − a) / (τ·(1 − b))``: the student's chunk probability rises where the teacher's
is higher and falls where it is lower; at a large τ (tokenkit's default 100) that is ≈ ``(1 − log p_T / log p_S)/τ``,
a match of log-likelihoods.

K teachers: at position t, teacher j's term is weighted by its share of the fused target there (``FusedTarget.weights``;
one-hot under MinCE), renormalised over the teachers with a chunk ending at t; a position where no teacher with a
chunk has a share counts nothing. Everything is per position (any batch sharding carries through) and jittable.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 1e-6


class TeacherChunks(NamedTuple):
    """K teachers' chunks on the target positions (a pytree)."""

    start: Any    # int32[B, T, K]: at a chunk's last position, the position predicting its first token; −1 elsewhere
    logprob: Any  # float32[B, T, K]: the teacher's log-probability of the chunk there; 0 elsewhere

    @classmethod
    def stack(cls, teachers: Sequence[Mapping[str, Any]], shape: tuple[int, int]) -> "TeacherChunks":
        """Loader teacher dicts (``batch["teachers"]``) → TeacherChunks; a teacher without chunks (an online one) has
        none: start −1 everywhere. ``shape`` = (B, T)."""
        starts, lps = [], []
        for t in teachers:
            if "chunk_start" in t:
                starts.append(jnp.asarray(t["chunk_start"], jnp.int32))
                lps.append(jnp.asarray(t["chunk_logprob"], jnp.float32))
            else:
                starts.append(jnp.full(shape, -1, jnp.int32))
                lps.append(jnp.zeros(shape, jnp.float32))
        if not starts:
            return cls(jnp.zeros((*shape, 0), jnp.int32), jnp.zeros((*shape, 0), jnp.float32))
        return cls(jnp.stack(starts, -1), jnp.stack(lps, -1))


def chunk_logprobs(token_logprob: jax.Array, start: jax.Array) -> jax.Array:
    """The student's log-probability of each chunk at its last position.

    token_logprob float32[B, T] (``log q_t(label_t)``, 0 where there is no label), start int32[B, T, K] → float32[B, T,
    K] (``Σ_{u=start}^{t} token_logprob[u]`` where start ≥ 0, else 0), from one cumulative sum."""
    csum = jnp.cumsum(token_logprob, axis=1)[..., None]                     # [B, T, 1]
    before = jnp.take_along_axis(jnp.broadcast_to(csum, start.shape), jnp.maximum(start - 1, 0), axis=1)
    return jnp.where(start >= 0, csum - jnp.where(start > 0, before, 0.0), 0.0)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − exp(x)) for x < 0, stable on both sides of log ½."""
    return jnp.where(x < -np.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def binary_kl(teacher_logprob: jax.Array, student_logprob: jax.Array, temperature: float) -> jax.Array:
    """KL(Bernoulli(a) ‖ Bernoulli(b)), a = exp(teacher_logprob/τ), b = exp(student_logprob/τ), elementwise (module
    docstring); the teacher side carries no gradient."""
    la = jnp.minimum(jax.lax.stop_gradient(teacher_logprob) / temperature, -EPSILON)
    lb = jnp.minimum(student_logprob / temperature, -EPSILON)
    a = jnp.exp(la)
    return a * (la - lb) + (1.0 - a) * (_log1mexp(la) - _log1mexp(lb))


def chunk_shares(chunks: TeacherChunks, weights: jax.Array) -> jax.Array:
    """float32[B, T, K]: each teacher's share of the fused target (``weights``) where its chunk ends, else 0; a
    position counts for likelihood matching where any is positive."""
    return jnp.where(jnp.asarray(chunks.start) >= 0, jnp.asarray(weights, jnp.float32), 0.0)


def likelihood_terms(token_logprob: jax.Array, chunks: TeacherChunks, weights: jax.Array,
                     temperature: float) -> tuple[jax.Array, jax.Array]:
    """Per-position likelihood-matching loss and where it counts.

    token_logprob float32[B, T], chunks (start/logprob [B, T, K]), weights float32[B, T, K] (each teacher's share of
    the fused target) → (loss float32[B, T], 0 where it does not count; mask bool[B, T])."""
    start = jnp.asarray(chunks.start, jnp.int32)
    student = chunk_logprobs(token_logprob, start)
    ell = jnp.where(start >= 0, binary_kl(jnp.asarray(chunks.logprob, jnp.float32), student, temperature), 0.0)
    w = chunk_shares(chunks, weights)                                        # [B, T, K]
    total = jnp.sum(w, -1)
    mask = total > 0
    return jnp.where(mask, jnp.sum(w * ell, -1) / jnp.where(mask, total, 1.0), 0.0), mask
