"""The sharded train step: fuse the teachers' sparse rows, one forward of the target, CLM + fusion loss, AdamW.

State (a plain dict pytree, checkpointed as is): ``step`` int32[], ``params`` (float32 master weights, sharded by the
logical rules), ``opt_state`` (optax, float32, sharded like the params). The forward runs in the model's
``compute_dtype`` (bf16 by default; norms, softmax and logits in float32).

One step on a global batch of B blocks (``data/loader.py``):

1. ``labels`` = the next token at each position; the teachers' rows fuse into one sparse target (``fusion.fuse``) —
   this does not depend on the student's parameters, so it is computed once for the whole batch;
2. the batch is split into ``accumulation`` micro-batches (rows ``i, i+A, …`` so that every device keeps its own rows);
   each runs the target forward and the chunked sparse losses, and the gradients are summed with
   ``lax.scan`` — each micro-batch's loss is normalised by the *whole* batch's token count (or count of non-empty
   blocks), so the summed gradient is exactly the full batch's;
3. clip, AdamW, and the metrics of the step (losses, λ, learning rate, gradient norm, per-teacher win counts).

Online teachers (``fusion_jax/online.py``): ``make_train_step(..., online=[OnlineTeacher, …])`` gives
``step_fn(state, batch, frozen)``, where ``frozen`` holds each online teacher's params and vocab map; their rows are
computed inside the step, before 1 (per micro-batch with accumulation), outside the gradient, and join the cached
teachers' rows in config order. ``frozen`` is an ordinary (not donated) argument.

``jax.jit`` with explicit in/out shardings; the state is donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusion_jax.config.model import ModelConfig
from fusion_jax.fusion import online as online_lib
from fusion_jax.fusion.fuse import FusedTarget, FusionConfig, fuse
from fusion_jax.fusion.likelihood import TeacherChunks, chunk_shares
from fusion_jax.fusion.losses import LossConfig, block_means, fusion_term, lm_weight, sparse_losses
from fusion_jax.models import decoder
from fusion_jax.train.optim import OptimizerConfig, make_optimizer, schedule

State = dict[str, Any]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward): 6 × matmul parameters (the unembedding included,
    the embedding gather not) + the attention scores and values, 12 · layers · heads · head_dim · seq_len
    (PaLM appendix B, without the causal halving)."""
    h, hd = cfg.hidden_size, cfg.dim_per_head
    attn = h * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    mlp = h * cfg.intermediate_size * (3 if cfg.mlp == "gated" else 2)
    matmul = cfg.num_layers * (attn + mlp) + h * cfg.vocab_size
    return 6.0 * matmul + 12.0 * cfg.num_layers * cfg.num_heads * hd * seq_len


def abstract_state(model_cfg: ModelConfig, opt: optax.GradientTransformation, mesh, rules) -> State:
    """ShapeDtypeStructs with shardings for the whole state — no memory is allocated (restore targets, --dry-run)."""
    param_sh = decoder.param_shardings(model_cfg, mesh, rules)
    params = decoder.abstract_params(model_cfg)
    opt_state = jax.eval_shape(opt.init, params)
    replicated = jax.NamedSharding(mesh, jax.P())
    opt_sh = optax.tree_utils.tree_map_params(opt, lambda _, s: s, opt_state, param_sh,
                                              transform_non_params=lambda _: replicated)
    with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    return {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "params": jax.tree.map(with_sh, params, param_sh),
        "opt_state": jax.tree.map(with_sh, opt_state, opt_sh),
    }


def state_shardings(abstract: State) -> State:
    return jax.tree.map(lambda a: a.sharding, abstract)


def init_state(params, opt: optax.GradientTransformation, abstract: State) -> State:
    """A fresh state around ``params`` (already placed by their shardings)."""
    opt_state = jax.jit(opt.init, out_shardings=state_shardings(abstract)["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), abstract["step"].sharding)
    return {"step": step, "params": params, "opt_state": opt_state}


def next_labels(tokens: jax.Array) -> jax.Array:
    """int32[B, T] → the token at t+1 (0 at the last position, which the masks exclude)."""
    return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def _fused(fusion_cfg: FusionConfig, batch_teachers, online, frozen, rules, accumulation: int,
           labels: jax.Array) -> FusedTarget:
    """The teachers' rows fused, or no target at all when there are no teachers (CLM-only training)."""
    if not batch_teachers and not online:
        return FusedTarget.empty(labels)
    return fuse(fusion_cfg, online_lib.stack_teachers(batch_teachers, online, frozen, rules, accumulation), labels)


def make_train_step(
    model_cfg: ModelConfig, fusion_cfg: FusionConfig, loss_cfg: LossConfig, opt_cfg: OptimizerConfig, steps: int,
    rules, online: tuple[online_lib.OnlineTeacher, ...] = (),
) -> tuple[Callable[..., tuple[State, dict]], optax.GradientTransformation]:
    """→ (step_fn(state, batch[, frozen]) -> (state, metrics), optimizer). Jit it with :func:`jit_train_step`.

    ``online``: the online teachers in config order (their ``frozen`` params and vocab maps are step_fn's third
    argument); the metrics then add ``src_overflow`` int32[len(online)]."""
    opt = make_optimizer(opt_cfg, steps)
    lr = schedule(opt_cfg, steps)
    a = opt_cfg.accumulation
    online = tuple(online)
    for o in online:
        o.validate()

    def step_fn(state: State, batch: dict, frozen=()) -> tuple[State, dict]:
        tokens, seg = batch["tokens"], batch["segment_ids"]
        labels = next_labels(tokens)
        target = _fused(fusion_cfg, batch["teachers"], online, frozen, rules, a, labels)
        clm_mask = batch["loss_mask"]
        base = clm_mask if loss_cfg.fusion_mask == "next_label" else seg > 0
        fusion_mask = base & target.has_target
        n_clm = jnp.maximum(clm_mask.sum(), 1).astype(jnp.float32)
        n_fus = jnp.maximum(fusion_mask.sum(), 1).astype(jnp.float32)
        # ``blocks``: the whole batch's non-empty blocks, not each micro-batch's (that would weigh a micro-batch
        # holding an empty block differently from the rest)
        n_clm_blocks = jnp.maximum(clm_mask.any(1).sum(), 1).astype(jnp.float32)
        n_fus_blocks = jnp.maximum(fusion_mask.any(1).sum(), 1).astype(jnp.float32)
        chunks = TeacherChunks.stack(batch["teachers"], tokens.shape)
        n_lik, n_lik_blocks = _likelihood_counts(loss_cfg, chunks, target)

        def reduced(out, name, n, n_blocks):
            """A micro-batch's share of the whole batch's ``name`` loss."""
            if loss_cfg.reduction == "tokens":
                return jnp.where(out[f"{name}_tokens"] > 0, out[name] * out[f"{name}_tokens"], 0.0) / n
            # per-block means, averaged over the non-empty blocks of the whole batch
            return jnp.sum(block_means(out[f"{name}_block_sum"], out[f"{name}_block_tokens"])) / n_blocks

        def micro_loss(master, mb):
            # Matrices in the compute dtype before use: FSDP all-gathers move bf16, not the float32 master copy.
            params = jax.tree.map(lambda p: p.astype(model_cfg.compute_dtype) if p.ndim > 1 else p, master)
            hidden = decoder.hidden_states(model_cfg, params, mb["tokens"], mb["segment_ids"], mb["positions"],
                                           rules=rules)
            out = sparse_losses(lambda h: decoder.unembed(model_cfg, params, h), hidden, mb["labels"],
                                mb["clm_mask"], mb["target"], mb["fusion_mask"], loss_cfg, mb["chunks"])
            clm = reduced(out, "clm", n_clm, n_clm_blocks)
            fus = reduced(out, "fusion", n_fus, n_fus_blocks)
            lik = reduced(out, "likelihood", n_lik, n_lik_blocks)
            lam = lm_weight(loss_cfg, state["step"], steps)
            return lam * clm + (1 - lam) * fusion_term(loss_cfg, fus, lik), (clm, fus, lik)

        micro = {"tokens": tokens, "segment_ids": seg, "positions": batch["positions"], "labels": labels,
                 "clm_mask": clm_mask, "fusion_mask": fusion_mask, "target": target, "chunks": chunks}
        micro = jax.tree.map(lambda x: online_lib.micro(x, a), micro)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(carry, mb):
            grads, loss, clm, fus, lik = carry
            (l, (c, f, k)), g = grad_fn(state["params"], mb)
            return (jax.tree.map(jnp.add, grads, g), loss + l, clm + c, fus + f, lik + k), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        (grads, loss, clm, fus, lik), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, 0.0, 0.0), micro)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        win = (target.weights * fusion_mask[..., None]).sum(axis=(0, 1))
        metrics = {
            "loss": loss, "clm": clm, "fusion": fus, "likelihood": lik,
            "lm_weight": lm_weight(loss_cfg, state["step"], steps),
            "learning_rate": lr(state["step"]), "grad_norm": optax.global_norm(grads),
            "clm_tokens": clm_mask.sum(), "fusion_tokens": fusion_mask.sum(), "teacher_wins": win,
        }
        if online:
            metrics["src_overflow"] = online_lib.overflow(batch["teachers"])
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step_fn, opt


def _likelihood_counts(loss_cfg: LossConfig, chunks: TeacherChunks, target: FusedTarget) -> tuple[jax.Array, jax.Array]:
    """The whole batch's count of likelihood-matching positions and of blocks holding one (each at least 1)."""
    if loss_cfg.likelihood_weight == 0:
        return jnp.float32(1.0), jnp.float32(1.0)
    mask = (chunk_shares(chunks, target.weights) > 0).any(-1)
    return (jnp.maximum(mask.sum(), 1).astype(jnp.float32),
            jnp.maximum(mask.any(1).sum(), 1).astype(jnp.float32))


def jit_train_step(step_fn, abstract: State, batch_spec: dict, mesh, frozen=None):
    """jax.jit with explicit shardings: state in/out as in ``abstract`` (donated), batch as the loader places it,
    metrics replicated. ``frozen`` (online teachers' params and vocab maps, as placed): the step then takes it as a
    third argument, in its own shardings, not donated."""
    state_sh = state_shardings(abstract)
    batch_sh = jax.tree.map(lambda s: s.sharding, batch_spec)
    replicated = jax.NamedSharding(mesh, jax.P())
    in_sh = (state_sh, batch_sh) if frozen is None else (state_sh, batch_sh, online_lib.frozen_shardings(frozen))
    with jax.set_mesh(mesh):
        return jax.jit(step_fn, in_shardings=in_sh, out_shardings=(state_sh, replicated), donate_argnums=(0,))


def host_metrics(metrics: dict) -> dict:
    """Device metrics → plain floats / lists (blocks until the step finished)."""
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = v.tolist() if v.ndim else float(v)
    return out


def eval_losses(model_cfg: ModelConfig, fusion_cfg: FusionConfig, loss_cfg: LossConfig, rules,
                online: tuple[online_lib.OnlineTeacher, ...] = ()):
    """→ fn(params, batch[, frozen]) -> sums for held-out evaluation: CLM and fusion loss sums and token counts, win
    counts (``frozen``: the online teachers' params and vocab maps, as for the train step)."""
    online = tuple(online)

    def fn(params, batch, frozen=()):
        tokens = batch["tokens"]
        labels = next_labels(tokens)
        target = _fused(fusion_cfg, batch["teachers"], online, frozen, rules, 1, labels)
        clm_mask = batch["loss_mask"]
        base = clm_mask if loss_cfg.fusion_mask == "next_label" else batch["segment_ids"] > 0
        fusion_mask = base & target.has_target
        hidden = decoder.hidden_states(model_cfg, params, tokens, batch["segment_ids"], batch["positions"], rules=rules)
        tokens_cfg = loss_cfg if loss_cfg.reduction == "tokens" else _with_tokens(loss_cfg)
        out = sparse_losses(lambda h: decoder.unembed(model_cfg, params, h), hidden, labels, clm_mask, target,
                            fusion_mask, tokens_cfg, TeacherChunks.stack(batch["teachers"], tokens.shape))
        return {"clm_sum": out["clm"] * out["clm_tokens"], "clm_tokens": out["clm_tokens"],
                "fusion_sum": out["fusion"] * out["fusion_tokens"], "fusion_tokens": out["fusion_tokens"],
                "likelihood_sum": out["likelihood"] * out["likelihood_tokens"],
                "likelihood_tokens": out["likelihood_tokens"],
                "teacher_wins": (target.weights * fusion_mask[..., None]).sum(axis=(0, 1))}

    return fn


def _with_tokens(loss_cfg: LossConfig) -> LossConfig:
    return dataclasses.replace(loss_cfg, reduction="tokens")
