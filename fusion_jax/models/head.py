"""The vocabulary head over many positions without a [B, T, V] buffer: hidden states → unembedding → log-sum-exp,
top-k and the next token's cross-entropy, in chunks of positions (one [B, chunk, V] float32 buffer at a time)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.models import decoder


def topk_step(cfg: ModelConfig, k: int, chunk: int, rules, params, tokens, segment_ids):
    """tokens int32[B, T], segment_ids int32[B, T] (0 = padding) →
    (topk_logprobs float32[B, T, k], topk_ids int32[B, T, k], token_ce float32[B, T]: −log p(tokens[t+1]) where
    t+1 is in the same segment, NaN elsewhere)."""
    hidden = decoder.hidden_states(cfg, params, tokens, segment_ids, rules=rules)
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    has_next = jnp.concatenate([(segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0),
                                jnp.zeros_like(segment_ids[:, :1], bool)], axis=1)

    head_name = "embed" if cfg.tie_embeddings else "lm_head"

    def chunk_rows(h, n, head):
        """h [b, C, D], n [b, C], head: the unembedding → top-k log-probs, ids, next-token CE of these rows."""
        logits = decoder.unembed(cfg, {head_name: head}, h)  # float32 [b, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        top_logits, top_ids = jax.lax.top_k(logits, k)  # log_softmax is a shift: same order, no [b, C, V] copy
        ce = lse - jnp.take_along_axis(logits, n[..., None], axis=-1)[..., 0]
        return top_logits - lse[..., None], top_ids.astype(jnp.int32), ce

    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = mesh_lib.logical_to_spec(("batch",), rules, mesh, (b,))[0] if rules and not mesh.empty else None
    if batch_axes is not None:
        # Per device on its own rows: left to sharding propagation, XLA gathers the whole batch's [B, C, V] logits
        # for top_k on every device (seen in the compiled HLO).
        P = jax.P
        chunk_rows = jax.shard_map(
            chunk_rows, mesh=mesh, in_specs=(P(batch_axes), P(batch_axes), P()),
            out_specs=(P(batch_axes), P(batch_axes), P(batch_axes)))

    def one_chunk(args):
        h, n = args  # [B, C, D], [B, C]
        return chunk_rows(h, n, params[head_name])

    to_chunks = lambda x: jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)
    from_chunks = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, t, *x.shape[3:])
    top_lp, top_ids, ce = jax.lax.map(one_chunk, (to_chunks(hidden), to_chunks(nxt)))
    return from_chunks(top_lp), from_chunks(top_ids), jnp.where(has_next, from_chunks(ce), jnp.nan)
