"""The vocabulary head over many positions without a [B, T, V] buffer: hidden states → unembedding → log-sum-exp,
top-k and the next token's cross-entropy, in chunks of positions (one [B, chunk, V] float32 buffer at a time).

:func:`map_chunks` is the chunking (the training loss uses it too, with its own per-chunk function);
:func:`head_over_chunks` runs the unembedding and a per-chunk function of the logits in it; :func:`topk_step`
(capture, online teachers) and :func:`ce_step` (bits per byte) are the model forward plus one of those functions.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.models import decoder


def map_chunks(fn: Callable, xs: tuple[jax.Array, ...], chunk: int):
    """fn over `chunk` positions at a time (``lax.map``, so one chunk's buffers at a time).

    xs: arrays [B, T, ...] → fn(*[B, C, ...] slices) for C = min(chunk, T) positions; its outputs (a pytree of
    [B, C, ...]) joined back to [B, T, ...]. T is zero-padded up to a multiple of C and the padding sliced off."""
    b, t = xs[0].shape[:2]
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t

    def to_chunks(x):  # [B, T, ...] → [n, B, C, ...]
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    def from_chunks(x):  # [n, B, C, ...] → [B, T, ...]
        x = jnp.moveaxis(x, 0, 1).reshape(b, n * chunk, *x.shape[3:])
        return x[:, :t] if pad else x

    out = jax.lax.map(lambda c: fn(*c), tuple(to_chunks(x) for x in xs))
    return jax.tree.map(from_chunks, out)


def next_tokens(tokens: jax.Array) -> jax.Array:
    """int32[B, T] → int32[B, T]: the token after each position (0 after the last)."""
    return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def head_over_chunks(cfg: ModelConfig, params, hidden: jax.Array, nxt: jax.Array, chunk: int,
                     of_logits: Callable, rules=None):
    """hidden [B, T, D], nxt int32[B, T] → of_logits(logits float32[b, C, V], nxt int32[b, C]) over every position,
    `chunk` positions at a time (its outputs [b, C, ...] joined to [B, T, ...]).

    With `rules` and a mesh set, each device computes its own batch rows (``shard_map``, the head replicated): left
    to sharding propagation, XLA gathers the whole batch's [B, C, V] logits for top_k on every device (seen in the
    compiled HLO). Without `rules`, sharding propagation decides."""
    head_name = "embed" if cfg.tie_embeddings else "lm_head"

    def chunk_rows(h, n, head):
        return of_logits(decoder.unembed(cfg, {head_name: head}, h), n)

    mesh = jax.sharding.get_abstract_mesh()
    b = hidden.shape[0]
    batch_axes = mesh_lib.logical_to_spec(("batch",), rules, mesh, (b,))[0] if rules and not mesh.empty else None
    if batch_axes is not None:
        rows = jax.P(batch_axes)
        chunk_rows = jax.shard_map(chunk_rows, mesh=mesh, in_specs=(rows, rows, jax.P()), out_specs=rows)
    return map_chunks(lambda h, n: chunk_rows(h, n, params[head_name]), (hidden, nxt), chunk)


def has_next(segment_ids: jax.Array) -> jax.Array:
    """bool[B, T]: position t+1 is in t's segment (and not padding)."""
    return jnp.concatenate([(segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0),
                            jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)


def topk_and_ce(k: int) -> Callable:
    """The per-chunk function of :func:`topk_step`: logits float32[b, C, V], nxt int32[b, C] →
    (top-k log-probs float32[b, C, k], their ids int32[b, C, k], CE of nxt float32[b, C])."""

    def of_logits(logits, nxt):
        lse = jax.nn.logsumexp(logits, axis=-1)
        top_logits, top_ids = jax.lax.top_k(logits, k)  # log_softmax is a shift: same order, no [b, C, V] copy
        ce = lse - jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0]
        return top_logits - lse[..., None], top_ids.astype(jnp.int32), ce

    return of_logits


def token_ce(logits: jax.Array, nxt: jax.Array) -> jax.Array:
    """The per-chunk function of :func:`ce_step`: logits float32[b, C, V], nxt int32[b, C] → −log p(nxt) [b, C]."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, nxt[..., None], axis=-1)[..., 0]


def topk_step(cfg: ModelConfig, k: int, chunk: int, rules, params, tokens, segment_ids):
    """tokens int32[B, T], segment_ids int32[B, T] (0 = padding) →
    (topk_logprobs float32[B, T, k], topk_ids int32[B, T, k], token_ce float32[B, T]: −log p(tokens[t+1]) where
    t+1 is in the same segment, NaN elsewhere). Each device takes its own rows' top-k (see head_over_chunks)."""
    hidden = decoder.hidden_states(cfg, params, tokens, segment_ids, rules=rules)
    top_lp, top_ids, ce = head_over_chunks(cfg, params, hidden, next_tokens(tokens), chunk, topk_and_ce(k), rules)
    return top_lp, top_ids, jnp.where(has_next(segment_ids), ce, jnp.nan)


def ce_step(cfg: ModelConfig, chunk: int, rules, params, tokens, segment_ids, score):
    """tokens int32[B, T], segment_ids int32[B, T] (0 = padding), score bool[B, T] → float32[B, T]:
    −log p(tokens[t+1] | its segment up to t) where score[t], 0 elsewhere (score[t] must imply that t+1 is in t's
    segment). The logits' sharding is left to XLA (`rules` only shard the forward)."""
    hidden = decoder.hidden_states(cfg, params, tokens, segment_ids, rules=rules)
    ce = head_over_chunks(cfg, params, hidden, next_tokens(tokens), chunk, token_ce)
    return jnp.where(score, ce, 0.0)


def token_ce_and_greedy(logits: jax.Array, nxt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The per-chunk function of :func:`ce_greedy_step`: (−log p(nxt) [b, C], nxt is the argmax bool[b, C])."""
    return token_ce(logits, nxt), jnp.argmax(logits, axis=-1) == nxt


def ce_greedy_step(cfg: ModelConfig, chunk: int, rules, params, tokens, segment_ids, score):
    """:func:`ce_step` and, beside it, bool[B, T]: tokens[t+1] is the model's most likely next token (False where
    not score[t]): the log-likelihood and greedy flags of lm-evaluation-harness's requests."""
    hidden = decoder.hidden_states(cfg, params, tokens, segment_ids, rules=rules)
    ce, greedy = head_over_chunks(cfg, params, hidden, next_tokens(tokens), chunk, token_ce_and_greedy)
    return jnp.where(score, ce, 0.0), score & greedy
